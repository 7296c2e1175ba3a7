"""Launcher detection and data-parallel initialisation (msrun, mpirun, env cluster, rank table).

On CPU, ``mindspore.communication.init()`` uses MindSpore's own collectives, which need its
scheduler process. ``msrun`` starts one; a plain ``mpirun`` does not, so under MPI on CPU we
bootstrap it here: MPI rank 0 spawns the scheduler (a small ``MS_ROLE=MS_SCHED`` subprocess) and
every rank becomes an ``MS_WORKER`` of it before ``init()``. MindSpore then assigns its own ranks,
which need not equal the MPI ranks, so all sharding uses ``get_rank()``.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from .errors import ConfigError

__all__ = ["DistInfo", "all_reduce_sum", "detect_launcher", "mpi_env", "bootstrap_mpi_scheduler", "check_launcher",
           "exit_process", "init_distributed", "raise_on_every_rank"]

_LOG = logging.getLogger("mindcv_poolformer")

# The scheduler serves until MPI rank 0, which started it, has exited: the kernel kills it then
# (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; a Python watcher thread would not run while ``init()`` holds
# the GIL). Its workers leave without unregistering (``exit_process``), so MindSpore's scheduler-side
# finalisation, which waits for them, never runs, and no server closes under a worker's TCP client
# teardown (SIGSEGV in libmindspore_cluster.so under TCPClient::Finalize, CI's rank 1).
_SCHEDULER_CODE = (
    "import ctypes, os, signal, threading\n"
    "parent = os.getppid()\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != parent:\n"
    "    os._exit(0)\n"
    "import mindspore as ms\n"
    "from mindspore.communication import init\n"
    "ms.set_device('CPU')\n"
    "init()\n"
    "threading.Event().wait()\n"
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size and the launcher that started it."""
    rank: int = 0
    world: int = 1
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def mpi_env() -> tuple[int, int] | None:
    """(rank, size) from Open MPI, MPICH/Intel MPI (PMI) or PMIx environments; None outside MPI."""
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                               ("PMIX_RANK", "PMI_SIZE")):
        if os.environ.get(rank_var) is not None and os.environ.get(size_var) is not None:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return None


def detect_launcher() -> str:
    """``msrun`` (or an MS_ROLE env cluster), ``mpirun``, ``rank_table`` (Ascend HCCL) or ``none``."""
    if os.environ.get("MS_ROLE"):
        return "msrun"
    if mpi_env() is not None:
        return "mpirun"
    if os.environ.get("RANK_TABLE_FILE") or (os.environ.get("RANK_SIZE") and os.environ.get("RANK_ID")):
        return "rank_table"
    return "none"


def _scheduler_port() -> int:
    """A port every MPI rank derives alike without talking to the others (MS_SCHED_PORT wins)."""
    if os.environ.get("MS_SCHED_PORT"):
        return int(os.environ["MS_SCHED_PORT"])
    job = (os.environ.get("OMPI_MCA_ess_base_jobid") or os.environ.get("PMIX_NAMESPACE")
           or os.environ.get("PMI_JOBID") or os.environ.get("OMPI_MCA_orte_hnp_uri") or str(os.getppid()))
    return 20000 + zlib.crc32(job.encode()) % 20000


def bootstrap_mpi_scheduler() -> None:
    """Turn an mpirun job into a MindSpore env cluster: rank 0 starts the scheduler, all become workers."""
    rank, size = mpi_env() or (0, 1)
    host = os.environ.get("MS_SCHED_HOST", "127.0.0.1")
    port = _scheduler_port()
    os.environ.update({"MS_SCHED_HOST": host, "MS_SCHED_PORT": str(port), "MS_WORKER_NUM": str(size)})
    if rank == 0:
        env = dict(os.environ, MS_ROLE="MS_SCHED")
        for var in [k for k in env if k.startswith(("OMPI_", "PMI_", "PMIX_"))]:
            env.pop(var)
        log = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the scheduler)
        proc = subprocess.Popen([sys.executable, "-c", _SCHEDULER_CODE], env=env, stdout=log, stderr=log)
        _LOG.info("mpirun: started the MindSpore scheduler (pid %d) on %s:%d", proc.pid, host, port)

        def _reap() -> None:
            # The kernel kills the scheduler when this process exits (see _SCHEDULER_CODE), so it is not
            # waited for here, only collected if it is already done.
            proc.poll()

        atexit.register(_reap)
    os.environ["MS_ROLE"] = "MS_WORKER"
    global _BOOTSTRAPPED
    _BOOTSTRAPPED = True
    _wait_for_port(host, port, timeout=120.0)


_BOOTSTRAPPED = False  # this process is a worker of the scheduler bootstrap_mpi_scheduler started


def exit_process(code: int) -> NoReturn:
    """End the script with ``code``; a worker of our mpirun scheduler skips MindSpore's cluster finalisation.

    MindSpore 2.10's exit handler (``ClearResAtexit -> FinalizeCluster -> TCPClient::Finalize``) crashes
    now and then in the TCP client's event thread (SIGSEGV: CI's rank 1, and ~1 in 10 loaded 2-rank runs
    here, with the scheduler still serving), turning a finished run into exit code 139. Our scheduler needs
    no goodbye from its workers (it leaves when MPI rank 0 does, see ``_SCHEDULER_CODE``), so such a worker
    flushes its output and leaves with ``os._exit`` once its run succeeded, or once it failed with an error
    that every rank raised together (``raise_on_every_rank``). Then a barrier after the flush keeps mpirun,
    which ends the job when a rank exits non-zero, from killing a peer before it has reported the same error,
    and a short grace period lets the barrier's last messages reach the peers (and keeps MPI rank 0's
    scheduler up) before the process is gone: a rank that left at once stranded its peer in the barrier
    (SIGTERM after ~20 s, in ~1 of 8 loaded runs here). Any other failure exits normally, where MindSpore's
    finalisation waits for every rank; so does every process outside our scheduler: msrun's own scheduler
    waits for each worker's finalisation.
    """
    if not _BOOTSTRAPPED or (code != 0 and not _FAILED_ON_EVERY_RANK):
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        all_reduce_sum(np.zeros(1, np.float32))  # every rank has printed its line
        time.sleep(_FAILED_EXIT_GRACE_S)
    os._exit(code)


_FAILED_EXIT_GRACE_S = 2.0
_FAILED_ON_EVERY_RANK = False  # the error being raised is one that every rank raises at the same point


def raise_on_every_rank(error: Exception) -> NoReturn:
    """Raise ``error``, known to be raised by every rank at this point (its finding was all-reduced).

    This lets ``exit_process`` meet the other ranks in one last collective instead of MindSpore's crash-prone
    finalisation. Only for errors decided from all-reduced values: a rank waiting in that barrier for a peer
    that is still training would hang.
    """
    global _FAILED_ON_EVERY_RANK
    _FAILED_ON_EVERY_RANK = True
    raise error


def _wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until the scheduler listens: workers that dial too early back off for tens of seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ConfigError(f"mpirun: the MindSpore scheduler at {host}:{port} did not start within {timeout:.0f} s "
                      "(set MS_SCHED_PORT to a free port)")


_ACTIVE: DistInfo | None = None  # this process's communication world, once init() has run


def _launch_script() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "train.py"


def check_launcher(launcher: str, device_target: str) -> None:
    """Refuse an MPI MindSpore cannot start on; warn about a rank table next to msrun/mpirun.

    MindSpore reads only Open MPI's variables: ``communication/management.py`` copies
    ``OMPI_COMM_WORLD_{RANK,LOCAL_RANK,SIZE}`` into ``RANK_ID``/``DEVICE_ID``/``RANK_SIZE`` and
    ``_comm_helper._check_mpi_envs`` wants ``OMPI_COMMAND`` and ``PMIX_RANK``. Under MPICH or Intel
    MPI (``PMI_RANK``) ``init()`` finds no ranks (on Ascend it asks for a rank table instead). On CPU
    our own scheduler bootstrap works under any MPI.
    """
    if launcher == "mpirun" and device_target != "CPU" and os.environ.get("OMPI_COMM_WORLD_RANK") is None:
        found = ("MPICH or Intel MPI (PMI_RANK set, no OMPI_COMM_WORLD_RANK)" if os.environ.get("PMI_RANK") is not None
                 else "an MPI without OMPI_COMM_WORLD_RANK")
        raise ConfigError(f"mpirun: MindSpore on {device_target} starts only under Open MPI's mpirun (it reads "
                          f"OMPI_COMM_WORLD_RANK, OMPI_COMMAND, PMIX_RANK), but this job runs under {found}; launch "
                          f"with Open MPI's `mpirun -n N python {_launch_script()} ...` or `msrun --worker_num=N "
                          f"--local_worker_num=N {_launch_script()} ...`")
    if launcher in ("msrun", "mpirun") and os.environ.get("RANK_TABLE_FILE"):
        _LOG.warning("RANK_TABLE_FILE=%s is set, but %s needs no rank table and it conflicts (MindSpore rewrites "
                     "RANK_ID/DEVICE_ID from it after init() and turns off its AllFinite overflow check); unset "
                     "RANK_TABLE_FILE", os.environ["RANK_TABLE_FILE"], launcher)


def init_distributed(distribute: bool, device_target: str) -> DistInfo:
    """Initialise communication and data parallelism if ``distribute``; otherwise a 1-process DistInfo.

    Call it before anything creates a Tensor or Parameter (MindSpore's rule for Ascend). A second
    call in the same process returns the first one's DistInfo: the CLI initialises before its
    checkpoint checks, the Trainer asks again.
    """
    global _ACTIVE
    if not distribute:
        return DistInfo()
    from mindspore.communication._comm_helper import GlobalComm

    if _ACTIVE is not None and GlobalComm.INITED:
        return _ACTIVE
    launcher = detect_launcher()
    if launcher == "none":
        script = _launch_script()
        raise ConfigError(f"distribute=True needs a launcher: run under `msrun --worker_num=N --local_worker_num=N "
                          f"{script} ...` or `mpirun -n N python {script} ...`, or pass --distribute False")
    check_launcher(launcher, device_target)
    if launcher == "mpirun" and device_target == "CPU":
        bootstrap_mpi_scheduler()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    _LOG.info("distributed: rank %d of %d (launcher %s)", rank, world, launcher)
    _ACTIVE = DistInfo(rank, world, launcher)
    return _ACTIVE


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """The sum of ``values`` over all ranks (``mindspore.communication`` must be initialised).
    MindSpore's CPU AllReduce takes float16/float32 only: pass float32, which holds counts exactly
    below 2**24.
    """
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(values)).asnumpy()
