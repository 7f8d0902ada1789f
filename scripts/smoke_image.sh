#!/usr/bin/env bash
# Smoke test of the built image, run as a user runs it but with buildah (no Docker daemon needed):
#  1. the image's own ENTRYPOINT + CMD (`sparse-fcmae --help`);
#  2. MinkowskiEngine and sparse_fcmae._C: built with CUDA (a GPU is not needed to tell);
#  3. `sparse-fcmae pretrain device=cpu optim.epochs=1` on the embedded digits, as a non-root uid, into a
#     mounted run folder: the checkpoint must belong to that uid (docker run --user "$(id -u):$(id -g)");
#  4. `sparse-fcmae convert --verify` of that checkpoint;
#  5. `torchrun` with 2 CPU processes (gloo), as multi-GPU runs start in the container.
# Usage: sudo bash scripts/smoke_image.sh [IMAGE]     (default sparse-fcmae:latest)
# Environment: STORAGE_DRIVER (the build's; buildah's default otherwise), SMOKE_USER (uid:gid, default the
# sudo caller's, or 1000:1000 when run as root directly).
set -euo pipefail
image="${1:-sparse-fcmae:latest}"
user="${SMOKE_USER:-${SUDO_UID:-1000}:${SUDO_GID:-1000}}"
[[ "$user" =~ ^[0-9]+:[0-9]+$ ]] || { echo "error: SMOKE_USER must be uid:gid, got '$user'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: needs root (buildah with --isolation chroot)" >&2; exit 1; }
bah() { buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"; }
bah images -q "$image" >/dev/null 2>&1 || { echo "error: no image $image (build it: scripts/build_image.sh)" >&2; exit 1; }

runs="$(mktemp -d /var/tmp/sparse-fcmae-smoke.XXXXXX)"
chown "$user" "$runs"  # the caller's own folder, as on a workstation
ctr=$(bah from --pull=never -q "$image")
trap 'bah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$runs"' EXIT
step() { echo; echo "== $*"; }
run() {  # like docker run --rm --user UID:GID -v RUNS:/workspace/runs IMAGE (one container, reused)
  local shown="$*"; [ "${shown//$'\n'/}" = "$shown" ] || shown="${shown%%$'\n'*} ..."  # first line of a script
  echo "\$ $shown"
  bah run --isolation chroot --user "$user" -v "$runs:/workspace/runs" "$ctr" -- "$@"
}

step "image: $image ($(bah images --format '{{.Size}}' "$image" | head -n1)), user $user"
mapfile -t entry < <(bah inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$image" | sed '/^$/d')
mapfile -t cmd < <(bah inspect --type image --format '{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' "$image" | sed '/^$/d')
echo "entrypoint: ${entry[*]:-none}  cmd: ${cmd[*]:-none}  workdir: $(bah inspect --type image --format '{{.OCIv1.Config.WorkingDir}}' "$image")"
[ "${entry[*]:-}" = sparse-fcmae ] || { echo "error: the entrypoint is '${entry[*]:-}', not sparse-fcmae" >&2; exit 1; }

step "0. what the image holds: the build context as copied (.dockerignore), the largest folders"
run sh -c 'ls -A /opt/sparse-fcmae | tr "\n" " "; echo; du -sh /opt/sparse-fcmae /opt/venv /usr/local/cuda-13.0 /usr 2>/dev/null'

step "1. docker run IMAGE (entrypoint + cmd)"
run "${entry[@]}" "${cmd[@]}"

step "2. MinkowskiEngine and sparse_fcmae._C built with CUDA"
run python -c "$(cat <<'PY'
import os, subprocess
import torch, MinkowskiEngine as ME, MinkowskiEngineBackend._C as MEB, sparse_fcmae, sparse_fcmae._C as K
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
# ME.is_cuda_available() is compile-time (CPU_ONLY undefined), not whether a GPU is present
print("MinkowskiEngine", ME.__version__, "| is_cuda_available():", ME.is_cuda_available(),
      "| cuda_version():", getattr(ME, "cuda_version", lambda: "n/a")(), "| GPU classes:", hasattr(MEB, "CoordinateMapManagerGPU_c10"))
for name, mod in (("MinkowskiEngineBackend._C", MEB), ("sparse_fcmae._C", K)):
    libs = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True).stdout.split()
    cuda = sorted({os.path.basename(x).split(".so")[0] for x in libs if x.startswith(("libcudart", "libcusparse", "libc10_cuda", "libtorch_cuda"))})
    print(f"{name}: links {', '.join(cuda) or 'no CUDA libraries'}")
print("sparse_fcmae._C with_cuda:", getattr(K, "with_cuda", "n/a"))
print("HOME", os.environ.get("HOME"), "writable:", os.access(os.path.expanduser("~"), os.W_OK), "| uid", os.getuid())
PY
)"

step "3. pretrain on the embedded digits, CPU, 1 epoch, into the mounted folder"
# (tqdm's progress bar redraws with carriage returns: keep the log lines)
run sparse-fcmae pretrain device=cpu optim.epochs=1 run_dir=runs/smoke 2>&1 | tr '\r' '\n' | grep -v '^pretrain: ' | grep -v '^$'

ls -ln "$runs/smoke"
ckpt="$runs/smoke/checkpoint-last.pth"
[ -f "$ckpt" ] || { echo "error: no checkpoint-last.pth in the run folder" >&2; exit 1; }
owner="$(stat -c %u:%g "$ckpt")"
[ "$owner" = "$user" ] || { echo "error: the checkpoint belongs to $owner, not $user" >&2; exit 1; }
echo "checkpoint owner $owner: the caller's"

step "4. convert --verify"
run sparse-fcmae convert runs/smoke/checkpoint-last.pth -o runs/smoke/encoder.safetensors --verify 2>&1 | tail -n 5
[ "$(stat -c %u:%g "$runs/smoke/encoder.safetensors")" = "$user" ]

step "5. torchrun inside the container: 2 CPU processes (gloo), 256 images"
# (a static rendezvous on 127.0.0.1: buildah's container hostname does not resolve, Docker's does)
run torchrun --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29517 -m sparse_fcmae.cli pretrain device=cpu optim.epochs=1 \
  data.max_images=256 run_dir=runs/ddp 2>&1 | tr '\r' '\n' | grep -v '^pretrain: ' | grep -v '^$'
[ "$(stat -c %u:%g "$runs/ddp/checkpoint-last.pth")" = "$user" ]
echo
echo "smoke test passed"
