"""A real Slurm cluster on this machine for the tests of the sbatch templates (tests/test_slurm.py).

Debian's slurm-wlm (22.05) and munge, installed with apt-get if missing. Each of the two nodes is a
set of namespaces: network (its own address on a private subnet; a veth pair joins the two, and
nothing is added to the machine's own network namespace), UTS (its hostname), mount (an /etc/hosts
mapping the node names to their addresses) and, for slurmd and everything it starts, PID (the
node's processes see only each other). So `hostname`, name resolution, pgrep and torchrun's
rendezvous behave as on separate hosts, on a shared file system. The controller and the client
commands run on the first node (the login node); one munged serves both through its socket.
Configuration, state, spool, logs and the munge key live in the cluster's folder (kept for a look
afterwards); `stop`, also after a failed start, leaves no daemon, process, namespace or interface
behind, and a cluster whose owner was killed is swept away by the next one's start.

    with SlurmCluster(Path("/tmp/cluster")) as cluster:
        job = cluster.sbatch(["launch/train_1node.sbatch", ...], cwd=repo)
        cluster.wait_for_state(job, {"COMPLETED"}, timeout_s=300)

Run as a script for a cluster to try things by hand (Ctrl-C stops it):

    python tests/slurm_cluster.py /tmp/cluster
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

# The commands the cluster and the templates need, and their Debian packages (util-linux's nsenter,
# unshare and mount are on every Debian system).
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
            "ip": "iproute2", "ss": "iproute2", "pgrep": "procps"}
SUBNET = "10.231.0"  # a private test subnet, only ever configured inside the namespaces
PREFIX = "fffvdi-slurm-"  # of the namespaces and the munge socket's folder: /tmp/PREFIX<owner pid>-...
GPUS_PER_NODE = 8  # count-only GPU resources, so that the templates' --gpus-per-node=8 is accepted
CPUS_PER_NODE = 64  # what the templates ask for (--cpus-per-task=64); slurmd is told to believe it

# Timers of the test cluster (seconds). cred_expire also delays a requeued job's restart (Slurm's default:
# 120); SlurmdTimeout is how long a silent node takes to be marked DOWN (default 300).
CRED_EXPIRE_S = 5
SLURMD_TIMEOUT_S = 5
KILL_WAIT_S = 30  # SIGTERM -> SIGKILL (Slurm's default): time for the save on scancel


def _which(cmd: str) -> Optional[str]:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def unavailable_reason() -> Optional[str]:
    """Why a cluster cannot be started here (None if it can)."""
    if sys.platform != "linux":
        return "needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, munged and slurmd run as root)"
    for cmd in ("nsenter", "unshare", "mount", "hostname"):
        if _which(cmd) is None:
            return f"needs `{cmd}`"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here (unshare: {probe.stderr.strip()})"
    if _which("apt-get") is None and missing_packages():
        return f"{' '.join(missing_packages())} missing, and no apt-get to install them"
    return None


def missing_packages() -> list[str]:
    return sorted({pkg for cmd, pkg in PACKAGES.items() if _which(cmd) is None})


def ensure_packages() -> None:
    """Install what is missing of Slurm (Debian bookworm: 22.05), munge, iproute2 and procps from the
    distribution, updating the package lists first if the install fails. The packages' own services, on
    a machine that starts them, do not matter: this cluster uses its own ports, socket and folders."""
    packages = missing_packages()
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               *packages]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(install)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if missing_packages():
        raise RuntimeError(f"installed {' '.join(packages)}, but {missing_packages()} still lack their commands")


def wait_for(what: str, predicate, timeout_s: float, poll_s: float = 0.5):
    """Poll `predicate()` until it returns something true, and return that; fail naming `what` after `timeout_s`."""
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def _end(*procs: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to all, then SIGKILL to those still running after `grace_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _killed_with_parent() -> None:
    """In a child before exec: SIGKILL when the process that started it dies (PR_SET_PDEATHSIG, kept
    across exec), so that a killed test run leaves no daemon behind (nor, through the nodes' PID
    namespaces, any job process)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def sweep_abandoned() -> None:
    """Namespaces and munge folders of clusters whose owner died without stopping them (SIGKILL):
    kill what still runs in the namespaces, delete them and the folders."""
    for path in [*Path("/run/netns").glob(f"{PREFIX}*"), *Path("/tmp").glob(f"{PREFIX}*")]:
        owner = path.name[len(PREFIX):].split("-")[0]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        if path.parent == Path("/tmp"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        for pid in subprocess.run(["ip", "netns", "pids", path.name], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", path.name], check=False)


class SlurmCluster:
    """The controller and a slurmd on each of two namespaced hosts, node1 and node2 (SUBNET.1 and .2)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.nodes = ["node1", "node2"]
        self.address = {n: f"{SUBNET}.{i}" for i, n in enumerate(self.nodes, start=1)}
        # Namespace names are machine-wide: unique to this cluster, with the owner's pid for the sweep.
        tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.netns = {n: f"{tag}-{n}" for n in self.nodes}
        self.conf = self.root / "slurm.conf"
        # munged wants every folder above its socket searchable by all (pytest's temporary folders are
        # not): the socket goes to a folder of its own in /tmp, removed by `stop` (or the sweep).
        self.munge_socket = Path("/tmp") / tag / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_")) and v != "SLURM_CONF"]:
            del self.env[var]  # a test run inside a Slurm job must not leak its job's settings
        self._daemons: dict[str, subprocess.Popen] = {}

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60) -> None:
        ensure_packages()
        sweep_abandoned()
        try:
            self._write_files()
            self._make_network()
            self._start_munge()
            self._daemons["slurmctld"] = self._spawn("slurmctld", self.nodes[0],
                                                     [_which("slurmctld"), "-D", "-f", str(self.conf)])
            for node in self.nodes:
                self.start_slurmd(node)
            self.wait_for_nodes({"idle"}, timeout_s)
        except BaseException:
            self.stop()
            raise

    def start_slurmd(self, node: str) -> None:
        """(Re)start `node`'s slurmd; nothing if it runs."""
        if f"slurmd-{node}" in self._daemons and self._daemons[f"slurmd-{node}"].poll() is None:
            return
        self._daemons[f"slurmd-{node}"] = self._spawn(
            f"slurmd-{node}", node, [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)], own_pids=True)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, kill whatever still runs in a node's namespace (job
        processes included), delete the namespaces (and with them the veth pair), stop munged."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            try:
                subprocess.run(self.on(self.nodes[0], ["scancel", "--full", "--user=root"]), env=self.env,
                               capture_output=True, timeout=15)
            except subprocess.TimeoutExpired:
                pass  # the namespace sweep below ends the jobs' processes anyway
        munged = self._daemons.pop("munged", None)
        # A node's daemon is `unshare --fork`, which ignores SIGTERM; its death (--kill-child) kills
        # slurmd, the PID namespace's first process, and with it everything on the node.
        for name, proc in self._daemons.items():
            if name.startswith("slurmd-") and proc.poll() is None:
                proc.kill()
        _end(*self._daemons.values())
        self._daemons.clear()
        for node in self.nodes:
            self.kill_node_processes(node)
            if Path(f"/run/netns/{self.netns[node]}").exists():
                subprocess.run(["ip", "netns", "delete", self.netns[node]], check=False)
        if munged is not None:
            _end(munged)
        shutil.rmtree(self.munge_socket.parent, ignore_errors=True)

    # -- on the nodes ----------------------------------------------------------------------------

    def on(self, node: str, cmd: list[str], own_pids: bool = False) -> list[str]:
        """`cmd` as run on `node`: in its network namespace, with its hostname and /etc/hosts; with
        `own_pids` (slurmd) also in a PID namespace of its own, so that the node's processes (the jobs'
        too) see only each other, as on a separate host (pgrep in the batch script's USR1 forwarding)."""
        hosts = self.root / "hosts"
        pids = ["--pid", "--fork", "--mount-proc", "--kill-child"] if own_pids else []
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup tree slurmd wants.
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}",
                "unshare", "--uts", "--mount", "--propagation", "private", *pids,
                "sh", "-c", 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"',
                node, str(hosts), *cmd]

    def run(self, cmd: list[str], node: Optional[str] = None, check: bool = True, timeout: float = 60,
            cwd: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scontrol, ...) on the login node (the first node)."""
        proc = subprocess.run(self.on(node or self.nodes[0], cmd), env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def node_pids(self, node: str) -> list[int]:
        """Every process in the node's network namespace (its daemons and its job processes)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_node_processes(self, node: str) -> None:
        """SIGKILL everything running on `node` (what a crashed or powered-off host looks like)."""
        for _ in range(5):  # processes may fork while being killed
            pids = self.node_pids(node) if Path(f"/run/netns/{self.netns[node]}").exists() else []
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def node_of(self, pid: int) -> Optional[str]:
        """The node a process runs on (None: none of ours)."""
        own = os.readlink(f"/proc/{pid}/ns/net")  # "net:[inode]"
        for node, ns in self.netns.items():
            if own == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]":
                return node
        return None

    def crash_node(self, node: str) -> None:
        """Every process of the node killed at once: slurmd, the job's slurmstepd, torchrun, the workers."""
        daemon = self._daemons.pop(f"slurmd-{node}", None)
        self.kill_node_processes(node)
        if daemon is not None:
            daemon.wait()

    # -- jobs ------------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict] = None) -> str:
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout_s: float) -> dict[str, str]:
        states = set(states)
        return wait_for(f"job {job_id} in {sorted(states)}",
                        lambda: (lambda job: job if job.get("JobState") in states else None)(self.job(job_id)),
                        timeout_s)

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "--noheader", "--Node", "--format=%N %T"]).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_for_nodes(self, states: Iterable[str], timeout_s: float, nodes: Optional[list[str]] = None) -> None:
        states, nodes = set(states), nodes or self.nodes

        def ready():
            try:
                current = self.node_states()
            except RuntimeError:  # the controller is still starting
                return False
            return all(current.get(n, "").rstrip("*~#!%$@^-") in states for n in nodes)

        try:
            wait_for(f"nodes {nodes} in {sorted(states)}", ready, timeout_s)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; logs: {self.root}/*.log") from None

    # -- set-up ----------------------------------------------------------------------------------

    def _write_files(self) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        self.munge_socket.parent.mkdir(mode=0o755)
        key = self.root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        hosts = ["127.0.0.1 localhost"] + [f"{addr} {node}" for node, addr in self.address.items()]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        node_lines = "".join(f"NodeName={n} NodeAddr={a} CPUs={CPUS_PER_NODE} Gres=gpu:{GPUS_PER_NODE} "
                             "State=UNKNOWN\n" for n, a in self.address.items())
        self.conf.write_text(f"""\
# A test cluster written by tests/slurm_cluster.py; everything under {self.root}.
ClusterName=fffvdi
SlurmctldHost={self.nodes[0]}({self.address[self.nodes[0]]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdTimeout={SLURMD_TIMEOUT_S}
KillWait={KILL_WAIT_S}
InactiveLimit=0
MinJobAge=600
GresTypes=gpu
{node_lines}PartitionName=test Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm drops GPUs without device files from a node's resources: plain files stand in for them.
        (self.root / "dev").mkdir(exist_ok=True)
        for i in range(GPUS_PER_NODE):
            (self.root / "dev" / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text(f"Name=gpu File={self.root}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n")

    def _make_network(self) -> None:
        for node in self.nodes:
            subprocess.run(["ip", "netns", "add", self.netns[node]], check=True)
            subprocess.run(["ip", "-n", self.netns[node], "link", "set", "lo", "up"], check=True)
        a, b = self.nodes
        # Both ends are created inside the namespaces: the machine's own namespace never sees them.
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.netns[a], "type", "veth",
                        "peer", "name", "eth0", "netns", self.netns[b]], check=True)
        for node in self.nodes:
            subprocess.run(["ip", "-n", self.netns[node], "addr", "add", f"{self.address[node]}/24", "dev", "eth0"],
                           check=True)
            subprocess.run(["ip", "-n", self.netns[node], "link", "set", "eth0", "up"], check=True)

    def _start_munge(self) -> None:
        self._daemons["munged"] = self._spawn("munged", None, [
            _which("munged"), "--foreground", f"--key-file={self.root}/munge.key", f"--socket={self.munge_socket}",
            f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
            f"--seed-file={self.root}/munged.seed"])
        munged = self._daemons["munged"]
        wait_for("munged's socket", lambda: self.munge_socket.exists() or munged.poll() is not None, 10, poll_s=0.1)
        if munged.poll() is not None:
            raise RuntimeError(f"munged exited: {(self.root / 'munged.stderr').read_text()}")

    def _spawn(self, name: str, node: Optional[str], cmd: list[str], own_pids: bool = False) -> subprocess.Popen:
        """A daemon in the foreground, on `node` (None: this machine), in a session of its own (a Ctrl-C or
        `timeout` signalling our process group must not stop it before `stop` cancels the jobs), killed
        when we die."""
        with open(self.root / f"{name}.stderr", "ab") as log:
            return subprocess.Popen(self.on(node, cmd, own_pids) if node else cmd, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_killed_with_parent)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="an empty folder for the cluster's files")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"error: cannot start a cluster here: {reason}")
    args.root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the cluster on kill/timeout too
    with SlurmCluster(args.root) as cluster:
        print(f"cluster up: {cluster.node_states()}; a shell on the login node:\n"
              f"  SLURM_CONF={cluster.conf} {shlex.join(cluster.on(cluster.nodes[0], ['bash']))}\n"
              "Ctrl-C stops the cluster.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
