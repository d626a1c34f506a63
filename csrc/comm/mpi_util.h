// Small MPI helpers shared by the ring and the MPI baselines (MPI part only).
#pragma once
#include <mpi.h>

#include <string>
#include <utility>
#include <vector>

namespace hpclm::mpi {

// Throws std::runtime_error naming `what` unless MPI is initialized and not yet finalized.
// hpclm never initializes MPI itself: mpi4py (imported by hpclm.probe) does.
void require_initialized(const char* what);

// Throws std::runtime_error "<what> failed: <MPI's error string>" unless rc is MPI_SUCCESS.
void check(int rc, const char* what);

// The communicator behind a Fortran handle (mpi4py: comm.py2f()); require_initialized(what) first.
MPI_Comm from_fortran(long long handle, const char* what);

// A duplicate of `comm` private to hpclm (its messages never match the caller's), with
// MPI_ERRORS_RETURN. Created collectively on first use and cached as an attribute of `comm`,
// so it is freed when `comm` is.
MPI_Comm private_comm(MPI_Comm comm);

// What the MPI library says about its transport: name/value pairs (selected PML, MCA settings
// read through MPI_T), only those it reports.
std::vector<std::pair<std::string, std::string>> transport_report();

}  // namespace hpclm::mpi
