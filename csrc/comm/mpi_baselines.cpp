// The MPI library's own collectives, with the same contract as ring_allreduce: the baselines
// the probe compares the ring with.
#include <climits>
#include <cstring>
#include <mutex>

#include "comm/allreduce.h"
#include "comm/mpi_util.h"

namespace hpclm {
namespace {

// MPI has no 16-bit float types: reduce them with our kernels (float32 arithmetic) as a
// user-defined, commutative MPI_Op over MPI_UINT16_T.
template <DType D, ReduceOp OP>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_into(inout, in, static_cast<size_t>(*len), D, OP, 1);
}

template <DType D>
MPI_User_function* half_function(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return &half_op<D, ReduceOp::sum>;
    case ReduceOp::prod: return &half_op<D, ReduceOp::prod>;
    case ReduceOp::min: return &half_op<D, ReduceOp::min>;
    default: return &half_op<D, ReduceOp::max>;
  }
}

MPI_Op half_mpi_op(DType dtype, ReduceOp op) {
  static std::mutex mutex;
  static MPI_Op ops[2][4] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                             {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
  std::lock_guard<std::mutex> lock(mutex);
  MPI_Op& slot = ops[dtype == DType::bf16][static_cast<int>(op)];
  if (slot == MPI_OP_NULL) {
    MPI_User_function* fn = dtype == DType::bf16 ? half_function<DType::bf16>(op) : half_function<DType::f16>(op);
    mpi::check(MPI_Op_create(fn, 1, &slot), "MPI_Op_create");
  }
  return slot;
}

MPI_Op builtin_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::prod: return MPI_PROD;
    case ReduceOp::min: return MPI_MIN;
    default: return MPI_MAX;
  }
}

MPI_Datatype builtin_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    default: return MPI_UINT16_T;
  }
}

}  // namespace

void library_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm) {
  mpi::require_initialized("library_allreduce");
  MPI_Comm c = mpi::private_comm(comm);
  bool half = dtype == DType::f16 || dtype == DType::bf16;
  MPI_Op mpi_op = half ? half_mpi_op(dtype, op.reduce) : builtin_op(op.reduce);
  MPI_Datatype type = builtin_type(dtype);
  const size_t esize = dtype_size(dtype);
  // MPI counts are int: long buffers go in pieces
  for (size_t done = 0; done < count;) {
    size_t piece = std::min<size_t>(count - done, INT_MAX);
    const void* src = send == recv ? MPI_IN_PLACE : static_cast<const char*>(send) + done * esize;
    mpi::check(MPI_Allreduce(src, static_cast<char*>(recv) + done * esize, static_cast<int>(piece), type, mpi_op, c),
               "MPI_Allreduce");
    done += piece;
  }
  if (op.average && count > 0) {
    int n = 1;
    MPI_Comm_size(c, &n);
    divide_by(recv, count, dtype, static_cast<double>(n), 1);
  }
}

void neighbor_sendrecv(const void* send, void* recv, size_t bytes, MPI_Comm comm) {
  mpi::require_initialized("neighbor_sendrecv");
  MPI_Comm c = mpi::private_comm(comm);
  int n = 1, rank = 0;
  MPI_Comm_size(c, &n);
  MPI_Comm_rank(c, &rank);
  for (size_t done = 0; done < bytes;) {
    size_t piece = std::min<size_t>(bytes - done, INT_MAX);
    mpi::check(MPI_Sendrecv(static_cast<const char*>(send) + done, static_cast<int>(piece), MPI_BYTE, (rank + 1) % n,
                            1, static_cast<char*>(recv) + done, static_cast<int>(piece), MPI_BYTE, (rank + n - 1) % n,
                            1, c, MPI_STATUS_IGNORE),
               "MPI_Sendrecv");
    done += piece;
  }
}

}  // namespace hpclm
