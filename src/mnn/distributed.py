r"""Data-parallel training over MPI: ``mpiexec -n N mnn train ...``.

Every rank (process) holds the whole network. Each step, the $N$ ranks split the global
batch of $B$ samples into equal shares of $B/N$, and rank $r$ computes the mean loss
$L_r$ of its share and its gradient $\nabla L_r$. The loss of the global batch is the mean
of the shares' means, so its gradient is the mean of theirs:

$$L = \frac{1}{B}\sum_{i=1}^{B} \ell_i = \frac{1}{N}\sum_{r} L_r, \qquad
  \nabla L = \frac{1}{N}\sum_{r} \nabla L_r. \tag{1}$$

One all-reduce (a sum that every rank receives) of the flat gradient buffer
(``mnn.flat``) computes Eq. (1); every rank then takes the same optimizer step from the
same weights, so the ranks stay identical without sending any weights. The result is
the one-process step up to the order of the floating-point sums.

Batch norm is the one layer whose forward pass mixes samples: its statistics must be
those of the global batch (synchronised batch norm, ``BatchNormLayer.batch_total``).

MPI comes from mpi4py (``pip install -e '.[mpi]'``), imported only when ``mpiexec``
started this process with more than one rank. On GPUs (``--backend cupy``) each rank
uses the GPU its local rank names, and the all-reduce goes through NCCL where it can
(``cupy.cuda.nccl``), through host memory and MPI otherwise.
"""
import numbers
import os

import numpy

from . import backend

# Set by the launcher in every rank it starts: MPICH's and Intel MPI's Hydra, Open MPI, MVAPICH.
# (Not Slurm's SLURM_STEP_NUM_TASKS: srun sets it in every task of a step, MPI ranks or not.)
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_connected = []  # the MpiRanks of this process, once connect() made it


def launched_rank():
    """This process's rank as the launcher set it, before MPI is connected (0 outside mpiexec)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class OneProcess:
    """Training in this process alone: every collective operation is the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    is_root = True

    def __repr__(self):
        return "ONE_PROCESS"

    def share(self, batch_size):
        return slice(None)

    def broadcast(self, arrays):
        pass

    def average(self, arrays):
        pass

    def sum(self, array):
        return array

    def mean(self, value):
        return value

    def any(self, flag):
        return bool(flag)


ONE_PROCESS = OneProcess()


def world_size():
    """How many ranks the MPI launcher started, read from its environment (1 without one)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def connect(backend_name="numpy"):
    """The ranks this process trains with: ``ONE_PROCESS``, or, under ``mpiexec -n N`` with N > 1,
    an ``MpiRanks`` over MPI's world communicator."""
    size = world_size()
    if size <= 1:
        return ONE_PROCESS
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError(f"started by mpiexec as one of {size} ranks, but mpi4py is not installed: in mnn's "
                           f"folder, pip install -e '.[mpi]' ({error})") from error
    if MPI.COMM_WORLD.Get_size() != size:
        raise RuntimeError(f"the launcher started {size} ranks, but mpi4py's MPI library sees "
                           f"{MPI.COMM_WORLD.Get_size()}: start them with the mpiexec of the MPI that mpi4py was "
                           f"built with ({MPI.Get_library_version().splitlines()[0].strip()})")
    ranks = MpiRanks(MPI.COMM_WORLD)
    _connected.append(ranks)
    if backend_name == "cupy":
        ranks.use_gpu()
    return ranks


def connected():
    """The ``MpiRanks`` of this process where ``connect`` made one, else None."""
    return _connected[0] if _connected else None


class MpiRanks:
    """This process as rank ``rank`` of ``size``: the batch share and the collective operations."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.is_root = self.rank == 0
        self.nccl = None

    def __repr__(self):
        return f"rank {self.rank} of {self.size}"

    def abort(self, code):
        """End every rank at once: after an error here, the others may be waiting for this one."""
        self.comm.Abort(code)

    def threads(self):
        """This rank's share of the machine's cores (the environment's thread variables still decide)."""
        if any(os.environ.get(name) for name in backend.THREAD_VARIABLES):
            return backend.cpu_threads()
        return max(1, backend.cpu_threads() // self.local_size)

    def share(self, batch_size):
        """The rows of each global batch that this rank trains on: its equal, contiguous share."""
        if batch_size % self.size:
            raise ValueError(f"--batch-size {batch_size} is the global batch, shared equally by {self.size} ranks: "
                             f"give a multiple of {self.size}")
        part = batch_size // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    # -- collective operations: every rank calls each, in the same order ----------
    def broadcast(self, arrays):
        """Overwrite each array with rank 0's, in place."""
        for array in arrays:
            host = to_host(array)
            self.comm.Bcast(host, root=0)
            copy_back(array, host)

    def average(self, arrays):
        """Eq. (1): each array becomes the mean over the ranks of that array, in place."""
        for array in arrays:
            self.sum_in_place(array)
            array /= self.size

    def sum(self, array):
        """The sum over the ranks of a number, or of an array (a new array)."""
        if isinstance(array, numbers.Number):
            return self.comm.allreduce(array, op=self.MPI.SUM)
        total = array.copy()
        self.sum_in_place(total)
        return total

    def sum_in_place(self, array):
        if self.nccl is not None and not isinstance(array, numpy.ndarray):
            return self.nccl_sum(array)
        host = to_host(array)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        copy_back(array, host)

    def mean(self, value):
        """The mean over the ranks of a number."""
        return self.comm.allreduce(float(value), op=self.MPI.SUM) / self.size

    def any(self, flag):
        """True on every rank if ``flag`` is true on any."""
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    # -- GPUs --------------------------------------------------------------------
    def use_gpu(self):
        """One GPU per rank on each machine, by local rank; NCCL for the sums where every rank has its own GPU."""
        import cupy

        devices = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.local_rank % devices).use()
        try:
            from cupy.cuda import nccl
        except ImportError:
            nccl = None
        own_gpu = self.local_size <= devices  # NCCL refuses two ranks on one GPU
        if not self.comm.allreduce(nccl is not None and own_gpu, op=self.MPI.LAND):
            return  # on some rank NCCL cannot run: every rank sums through host memory
        unique_id = self.comm.bcast(nccl.get_unique_id() if self.is_root else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def nccl_sum(self, array):
        import cupy
        from cupy.cuda import nccl

        kinds = {numpy.dtype(numpy.float16): nccl.NCCL_FLOAT16, numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32,
                 numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64}
        self.nccl.allReduce(array.data.ptr, array.data.ptr, array.size, kinds[array.dtype], nccl.NCCL_SUM,
                            cupy.cuda.get_current_stream().ptr)


def to_host(array):
    """A contiguous NumPy array with ``array``'s values: the array itself where it is one."""
    if isinstance(array, numpy.ndarray) and array.flags.c_contiguous:
        return array
    return numpy.ascontiguousarray(backend.to_numpy(array))


def copy_back(array, host):
    if host is not array:
        array[...] = backend.array_module(array).asarray(host)
