# Source on the GPU machine: makes FlashInfer's source distribution importable with its JIT.
# usage: source bench/setup_flashinfer.sh PATH/flashinfer_python-*.tar.gz
# (pip cannot build the sdist there; its JIT builds the decode kernels for sm_90 on first use.)
_fi_tar=${1:?path to the flashinfer source tarball}
_fi_root=/tmp/flashinfer_src
mkdir -p "$_fi_root" && tar xzf "$_fi_tar" -C "$_fi_root"
_fi_dir=$(ls -d "$_fi_root"/flashinfer_python-*/ | head -n 1)
mkdir -p "$_fi_dir/flashinfer/data"
for _d in include csrc tvm_binding; do ln -sfn "$_fi_dir/$_d" "$_fi_dir/flashinfer/data/$_d"; done
ln -sfn "$_fi_dir/3rdparty/cutlass" "$_fi_dir/flashinfer/data/cutlass"
ln -sfn "$_fi_dir/3rdparty/spdlog" "$_fi_dir/flashinfer/data/spdlog"
export PYTHONPATH="$_fi_dir${PYTHONPATH:+:$PYTHONPATH}"
export FLASHINFER_CUDA_ARCH_LIST=9.0 TORCH_CUDA_ARCH_LIST=9.0
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer_ws}
