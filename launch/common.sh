# Shared by the sbatch templates: environment, NCCL settings and SIGUSR1 forwarding.
# Sourced by train_1node.sbatch and train_multinode.sbatch; edit the lines marked EDIT for your cluster.

# EDIT: activate the environment made by scripts/setup_env.sh (or load your module system's).
cd "${FFF_VDI_REPO:?set FFF_VDI_REPO to the repository path}"
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi

# NCCL: fail fast instead of hanging; keep NVLink multicast (NVLS) off where the cluster asks for it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# EDIT: the network interface / InfiniBand HCAs of your nodes, e.g.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Processes per node: one per GPU the job was given (--gpus-per-node), 8 without a GPU request.
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}

# Slurm sends SIGUSR1 to this batch shell 300 s before the time limit (--signal=B:USR1@300).
# torchrun does not forward USR1 to its workers, so send it to the children of this job's torchrun
# agents (the training processes) on every node, and say how many got it where. "[t]" keeps pgrep
# from matching its own command line; srun's command line names torchrun too (its child would get
# the signal); SLURM_JOB_ID in an agent's environment keeps other jobs on a shared node out. The
# workers save a checkpoint at the next step boundary, rank 0 requeues the job and everyone exits 0;
# the requeued job resumes (trainer.resume=auto).
forward_usr1() {
  echo "$(date +%T) batch script: SIGUSR1 received, forwarding to the training processes"
  srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '
    sent=0
    for agent in $(pgrep -f "[t]orchrun.*launch/train.py"); do
      [ "$(cat "/proc/$agent/comm" 2>/dev/null)" = srun ] && continue
      tr "\0" "\n" < "/proc/$agent/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID" || continue
      for worker in $(pgrep -P "$agent"); do kill -USR1 "$worker" && sent=$((sent + 1)); done
    done
    echo "$(date +%T) ${SLURMD_NODENAME:-$(hostname)}: SIGUSR1 sent to $sent training process(es)"' || true
}
trap forward_usr1 USR1

# Run a command in the background and wait for it, surviving the trap's interruption of `wait`.
run_and_wait() {
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
  done
  wait "$pid"
}
