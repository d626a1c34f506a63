// ShmAllreduce: a POSIX shared-memory segment per group; flags with release/acquire ordering.
#include "comm/shm_allreduce.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "comm/mpi_util.h"
#include "comm/reduce.h"

namespace hpclm {
namespace {

constexpr size_t kFlagStride = 128;  // one flag per two cache lines: no false sharing with a neighbour's prefetch

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Announcement {  // rank 0 -> every rank: the segment's name, or why there is none
  int ok;
  char name[64];
  char error[192];
};

std::string errno_text(const char* what, const char* name) {
  return std::string(what) + " " + name + ": " + std::strerror(errno);
}

// Rank 0 creates the segment, sized and backed now (posix_fallocate: a full /dev/shm fails here,
// not as SIGBUS on first touch).
Announcement create_segment(size_t bytes) {
  static unsigned counter = 0;
  Announcement a{};
  auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  std::snprintf(a.name, sizeof(a.name), "/hpclm-tp-%d-%u-%llx", static_cast<int>(getpid()), counter++,
                static_cast<unsigned long long>(now) & 0xffffffull);
  int fd = shm_open(a.name, O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    std::snprintf(a.error, sizeof(a.error), "%s", errno_text("shm_open", a.name).c_str());
    return a;
  }
  int rc = ftruncate(fd, static_cast<off_t>(bytes)) == 0 ? posix_fallocate(fd, 0, static_cast<off_t>(bytes)) : errno;
  close(fd);
  if (rc != 0) {
    errno = rc;
    std::snprintf(a.error, sizeof(a.error), "%s", errno_text("sizing", a.name).c_str());
    shm_unlink(a.name);
    return a;
  }
  a.ok = 1;
  return a;
}

char* map_segment(const char* name, size_t bytes, std::string* error) {
  int fd = shm_open(name, O_RDWR, 0600);
  if (fd < 0) {
    *error = errno_text("shm_open", name);
    return nullptr;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    *error = errno_text("mmap", name);
    return nullptr;
  }
  return static_cast<char*>(p);
}

}  // namespace

std::unique_ptr<ShmAllreduce> ShmAllreduce::create(MPI_Comm user, size_t slot_bytes, std::string* why) {
  mpi::require_initialized("shared-memory allreduce");
  MPI_Comm comm = mpi::private_comm(user);
  int n = 1, rank = 0;
  MPI_Comm_size(comm, &n);
  MPI_Comm_rank(comm, &rank);
  MPI_Comm node;
  mpi::check(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
  int on_node = 0;
  MPI_Comm_size(node, &on_node);
  MPI_Comm_free(&node);
  int mine = on_node == n, all = 0;
  mpi::check(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  if (!all) {
    *why = "the group's ranks are not all on one node";
    return nullptr;
  }
  slot_bytes = std::max<size_t>(64, (slot_bytes + 63) / 64 * 64);
  const size_t bytes = n * kFlagStride + size_t(2) * n * slot_bytes;

  Announcement a{};
  if (rank == 0) a = create_segment(bytes);
  mpi::check(MPI_Bcast(&a, sizeof(a), MPI_BYTE, 0, comm), "MPI_Bcast");
  if (!a.ok) {
    *why = a.error;
    return nullptr;
  }
  std::string error;
  char* base = map_segment(a.name, bytes, &error);
  int mapped = base != nullptr, everyone = 0;
  mpi::check(MPI_Allreduce(&mapped, &everyone, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  if (rank == 0) shm_unlink(a.name);  // every rank holds its mapping now; the memory goes with the last one
  if (!everyone) {
    if (base != nullptr) munmap(base, bytes);
    *why = error.empty() ? std::string("another rank could not map ") + a.name : error;
    return nullptr;
  }
  return std::unique_ptr<ShmAllreduce>(new ShmAllreduce(base, bytes, n, rank, slot_bytes));
}

ShmAllreduce::ShmAllreduce(char* base, size_t mapped, int ranks, int rank, size_t slot_bytes)
    : base_(base), mapped_(mapped), ranks_(ranks), rank_(rank), slot_bytes_(slot_bytes) {}

ShmAllreduce::~ShmAllreduce() { munmap(base_, mapped_); }

std::atomic<uint64_t>& ShmAllreduce::flag(int r) const {
  return *reinterpret_cast<std::atomic<uint64_t>*>(base_ + r * kFlagStride);
}

char* ShmAllreduce::slot(int r, uint64_t seq) const {
  return base_ + ranks_ * kFlagStride + (size_t(2) * r + (seq & 1)) * slot_bytes_;
}

// Spin briefly (the peer is usually microseconds behind), then yield the core (oversubscribed
// ranks), then sleep in short naps. A peer that dies takes this rank with it: the launcher (mpirun,
// srun with PMIx) ends the job, as it does for ranks blocked in MPI.
void ShmAllreduce::wait_for(int r, uint64_t seq) const {
  using clock = std::chrono::steady_clock;
  const std::atomic<uint64_t>& f = flag(r);
  const auto start = clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (f.load(std::memory_order_acquire) >= seq) return;
      cpu_relax();
    }
    const auto now = clock::now();
    if (now - start < std::chrono::microseconds(20)) continue;
    if (now - start < std::chrono::milliseconds(1)) {
      sched_yield();
      continue;
    }
    timespec nap{0, 20000};
    nanosleep(&nap, nullptr);
  }
}

void ShmAllreduce::allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op) {
  const size_t esize = dtype_size(dtype);
  const size_t per_piece = slot_bytes_ / esize;
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  for (size_t done = 0; done < count; done += per_piece) {
    const size_t m = std::min(per_piece, count - done);
    const uint64_t seq = ++seq_;
    std::memcpy(slot(rank_, seq), in + done * esize, m * esize);
    flag(rank_).store(seq, std::memory_order_release);
    for (int r = 0; r < ranks_; ++r)
      if (r != rank_) wait_for(r, seq);
    char* dst = out + done * esize;
    if (ranks_ == 1) {
      std::memcpy(dst, slot(0, seq), m * esize);
      continue;
    }
    reduce_to(dst, slot(0, seq), slot(1, seq), m, dtype, op.reduce, 1);
    for (int r = 2; r < ranks_; ++r) reduce_into(dst, slot(r, seq), m, dtype, op.reduce, 1);
    if (op.average) divide_by(dst, m, dtype, static_cast<double>(ranks_), 1);
  }
}

}  // namespace hpclm
