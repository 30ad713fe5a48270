# Sourced by the examples/run_*.sh scripts: one place that turns a layout into a launch.
#
#   launch NNODES NPROC_PER_NODE pretrain_omni.py-arguments...
#
# One node: `torchrun --standalone`. Several: c10d rendezvous at $MASTER_ADDR:$MASTER_PORT,
# the same command on every node (ranks are assigned by the rendezvous), restarted up to
# $MAX_RESTARTS times on a failure; checkpoint.resume=auto picks up the latest complete
# checkpoint. DRY_RUN=1 prints the command instead of running it (tests/test_examples.py
# checks every script's layout that way).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

launch() {
    local nnodes="$1" nproc="$2"
    shift 2
    local cmd
    if [ "$nnodes" -eq 1 ] && [ "$nproc" -eq 1 ]; then
        cmd=(python "$ROOT/pretrain_omni.py")
    elif [ "$nnodes" -eq 1 ]; then
        cmd=(torchrun --standalone --nnodes=1 --nproc-per-node="$nproc" "$ROOT/pretrain_omni.py")
    else
        : "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node, the same on every node}"
        cmd=(torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=c10d
             --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RUN_ID:-omni}"
             --max-restarts="${MAX_RESTARTS:-3}" "$ROOT/pretrain_omni.py")
    fi
    cmd+=("$@")
    # torch 2.13's torchrun shares its rendezvous store with the workers, and a restarted round
    # then cannot connect (pytorch/pytorch#135712): keep them apart so --max-restarts works.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%s\n' "${cmd[@]}"
    else
        exec "${cmd[@]}"
    fi
}
