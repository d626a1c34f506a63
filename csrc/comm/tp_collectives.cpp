// Collectives for tensor-parallel activations: latency-bound messages inside one TP group.
//
// doubling_allreduce: recursive doubling, log2(n) rounds of one MPI_Sendrecv of the whole buffer with
// rank ^ mask and one reduction; each round combines two values every member of the pair already
// holds alike, so every rank ends with the same bits. TpComm picks, per message, the group's
// shared-memory segment (ranks on one node), else doubling up to `small_bytes` on a power-of-two
// group, else the pipelined ring.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "comm/allreduce.h"
#include "comm/mpi_util.h"
#include "comm/shm_allreduce.h"

namespace hpclm {
namespace {

constexpr int kDoublingTag = 0x44424c;  // "DBL"; on hpclm's private communicator

bool power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace

void doubling_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm) {
  mpi::require_initialized("doubling_allreduce");
  MPI_Comm c = mpi::private_comm(comm);
  int n = 1, rank = 0;
  MPI_Comm_size(c, &n);
  MPI_Comm_rank(c, &rank);
  if (!power_of_two(n)) throw std::invalid_argument("doubling_allreduce needs a power-of-two number of ranks");
  const size_t bytes = count * dtype_size(dtype);
  if (bytes > size_t(INT_MAX)) throw std::invalid_argument("doubling_allreduce: message over 2 GiB, use the ring");
  if (send != recv && bytes) std::memcpy(recv, send, bytes);
  if (count == 0 || n == 1) return;
  const size_t stride = (bytes + 63) / 64 * 64;
  char* other = thread_scratch(2 * stride);
  char* combined = other + stride;
  for (int mask = 1; mask < n; mask <<= 1) {
    int partner = rank ^ mask;
    mpi::check(MPI_Sendrecv(recv, static_cast<int>(bytes), MPI_BYTE, partner, kDoublingTag, other,
                            static_cast<int>(bytes), MPI_BYTE, partner, kDoublingTag, c, MPI_STATUS_IGNORE),
               "MPI_Sendrecv");
    // the lower rank's value first on both sides, so min/max ties and rounding agree bit for bit
    if (rank < partner)
      reduce_into(recv, other, count, dtype, op.reduce, 1);
    else {
      reduce_to(combined, other, recv, count, dtype, op.reduce, 1);
      std::memcpy(recv, combined, bytes);
    }
  }
  if (op.average) divide_by(recv, count, dtype, static_cast<double>(n), 1);
}

TpComm::TpComm(MPI_Comm comm, size_t small_bytes, size_t shm_bytes, size_t slot_bytes)
    : comm_(comm), small_bytes_(small_bytes), shm_bytes_(shm_bytes) {
  mpi::require_initialized("TpComm");
  MPI_Comm_size(comm, &size_);
  if (shm_bytes == 0)
    no_shm_ = "shared memory turned off";
  else
    shm_ = ShmAllreduce::create(comm, std::min(slot_bytes, shm_bytes), &no_shm_);
}

TpComm::~TpComm() = default;

void TpComm::allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op) {
  const auto start = std::chrono::steady_clock::now();
  const size_t bytes = count * dtype_size(dtype);
  if (shm_ && bytes <= shm_bytes_)
    shm_->allreduce(send, recv, count, dtype, op);
  else if (power_of_two(size_) && bytes <= small_bytes_)
    doubling_allreduce(send, recv, count, dtype, op, comm_);
  else
    ring_allreduce(send, recv, count, dtype, op, comm_);
  seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++calls_;
}

std::string TpComm::transport() const { return shm_ ? "shared memory" : "MPI (" + no_shm_ + ")"; }

double TpComm::take_seconds() {
  double s = seconds_;
  seconds_ = 0;
  return s;
}

void allgather_bytes(const void* send, void* recv, size_t bytes, MPI_Comm comm) {
  mpi::require_initialized("allgather_bytes");
  if (bytes > size_t(INT_MAX)) throw std::invalid_argument("allgather_bytes: a rank's part is over 2 GiB");
  MPI_Comm c = mpi::private_comm(comm);
  mpi::check(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes), MPI_BYTE, c),
             "MPI_Allgather");
}

}  // namespace hpclm
