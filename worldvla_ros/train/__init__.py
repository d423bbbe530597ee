"""Training a small WorldVLA on recorded bags: an image tokenizer (VQGAN) and the backbone.

Pure PyTorch on the model core's own code (tokenizers, prompts, attention mask, checkpoint
writer); no ROS.
"""
