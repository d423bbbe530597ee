"""Python packaging of worldvla_ros (the messages are built by CMakeLists.txt)."""
from setuptools import find_packages, setup

setup(
    name='worldvla-ros',
    version='0.1.0',
    packages=find_packages(include=['worldvla_ros', 'worldvla_ros.*']),
    package_data={'worldvla_ros': ['py.typed', 'data/tabletop_model/*', 'data/tabletop_model/tokenizer/*']},
    python_requires='>=3.10',
    install_requires=[
        'numpy>=1.24',
        'torch>=2.1',
        'transformers>=4.57',
        'tokenizers>=0.20',
        'safetensors>=0.4',
        'opencv-python-headless>=4.8',
        'pillow>=10',
        'pyyaml>=6',
        'rosbags>=0.10',
        'tqdm>=4.60',
        'scikit-image>=0.21',
        'scipy>=1.10',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-timeout>=2', 'ruff>=0.6', 'psutil>=5', 'hypothesis>=6'],
        'eval': ['matplotlib>=3.7', 'h5py>=3.8'],
        'train': ['peft>=0.13'],  # worldvla_finetune --method lora
    },
    zip_safe=False,
    maintainer='worldvla maintainers',
    maintainer_email='maintainers@worldvla-ros.org',
    description='WorldVLA action world model on ROS 2',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'action_node = worldvla_ros.nodes.action_node:main',
            'fleet_node = worldvla_ros.nodes.fleet_node:main',
            'world_model_node = worldvla_ros.nodes.world_model_node:main',
            'worldvla_bringup = worldvla_ros.bringup:main',
            'worldvla_finetune = worldvla_ros.train.finetune:main',
            'make_tiny_checkpoint = worldvla_ros.model.tiny:main',
            'evaluate_bag = worldvla_ros.evaluation.cli:main',
            'convert_to_bag = worldvla_ros.evaluation.convert:main',
            'sim_node = worldvla_ros.nodes.sim_node:main',
            'record_demos = worldvla_ros.sim.record:main',
            'worldvla_train = worldvla_ros.train.cli:main',
            'worldvla_sim_eval = worldvla_ros.sim.closed_loop:main',
            'libero_sim_node = worldvla_ros.nodes.libero_sim_node:main',
            'worldvla_libero_eval = worldvla_ros.sim.libero_eval:main',
        ],
    },
)
