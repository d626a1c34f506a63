#include "comm/mpi_util.h"

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <stdexcept>

namespace hpclm::mpi {

void require_initialized(const char* what) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized)
    throw std::runtime_error(std::string(what) + ": MPI is not initialized; import mpi4py first "
                             "('from mpi4py import MPI' initializes it; hpclm.probe does this)");
  if (finalized) throw std::runtime_error(std::string(what) + ": MPI has already been finalized");
}

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(std::string(what) + " failed: " + std::string(text, len));
}

MPI_Comm from_fortran(long long handle, const char* what) {
  require_initialized(what);
  return MPI_Comm_f2c(static_cast<MPI_Fint>(handle));
}

namespace {

int free_private_comm(MPI_Comm, int, void* attr, void*) {
  MPI_Comm* dup = static_cast<MPI_Comm*>(attr);
  int rc = MPI_Comm_free(dup);
  delete dup;
  return rc;
}

}  // namespace

MPI_Comm private_comm(MPI_Comm comm) {
  static int keyval = MPI_KEYVAL_INVALID;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (keyval == MPI_KEYVAL_INVALID)
    check(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, free_private_comm, &keyval, nullptr),
          "MPI_Comm_create_keyval");
  void* attr = nullptr;
  int found = 0;
  check(MPI_Comm_get_attr(comm, keyval, &attr, &found), "MPI_Comm_get_attr");
  if (found) return *static_cast<MPI_Comm*>(attr);
  auto* dup = new MPI_Comm;
  int rc = MPI_Comm_dup(comm, dup);
  if (rc != MPI_SUCCESS) {
    delete dup;
    check(rc, "MPI_Comm_dup");
  }
  MPI_Comm_set_errhandler(*dup, MPI_ERRORS_RETURN);
  check(MPI_Comm_set_attr(comm, keyval, dup), "MPI_Comm_set_attr");
  return *dup;
}

namespace {

// Open MPI keeps the PML chosen at MPI_Init in mca_pml_base_selected_component, whose header is
// mca_base_component_2_1_0_t: 3 ints, project name[16], 3 ints, type name[32], 3 ints, component
// name[64]. Read only when the type name found there is "pml", else report nothing.
std::string openmpi_selected_pml() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&MPI_Init), &info) == 0 || info.dli_fname == nullptr) return "";
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return "";
  const char* component = static_cast<const char*>(dlsym(lib, "mca_pml_base_selected_component"));
  dlclose(lib);
  if (component == nullptr) return "";
  const char* type_name = component + 3 * sizeof(int) + 16 + 3 * sizeof(int);
  const char* name = type_name + 32 + 3 * sizeof(int);
  if (std::strncmp(type_name, "pml", 4) != 0 || std::memchr(name, '\0', 64) == nullptr) return "";
  return name;
}

// One control variable through MPI_T, as text; "" when the library has no such variable.
std::string read_cvar(const char* wanted) {
  int index = 0;
  if (MPI_T_cvar_get_index(wanted, &index) != MPI_SUCCESS) return "";
  char name[256], desc[256];
  int name_len = sizeof(name), desc_len = sizeof(desc), verbosity, bind, scope;
  MPI_Datatype type;
  MPI_T_enum enumtype;
  if (MPI_T_cvar_get_info(index, name, &name_len, &verbosity, &type, &enumtype, desc, &desc_len, &bind, &scope) !=
          MPI_SUCCESS ||
      bind != MPI_T_BIND_NO_OBJECT)
    return "";
  MPI_T_cvar_handle handle;
  int count = 0;
  if (MPI_T_cvar_handle_alloc(index, nullptr, &handle, &count) != MPI_SUCCESS) return "";
  std::string value;
  if (type == MPI_CHAR && count > 0) {
    std::vector<char> buf(static_cast<size_t>(count) + 1, '\0');
    if (MPI_T_cvar_read(handle, buf.data()) == MPI_SUCCESS) value = buf.data();
  } else if (type == MPI_C_BOOL && count == 1) {
    unsigned char v[16] = {};  // Open MPI stores a C bool; room to spare for any width
    if (MPI_T_cvar_read(handle, v) == MPI_SUCCESS) value = v[0] ? "true" : "false";
  } else if (type == MPI_INT && count == 1) {
    int v = 0;
    if (MPI_T_cvar_read(handle, &v) == MPI_SUCCESS) {
      value = std::to_string(v);
      int items = 0;
      char enum_name[64];
      int enum_name_len = sizeof(enum_name);
      if (enumtype != MPI_T_ENUM_NULL && MPI_T_enum_get_info(enumtype, &items, enum_name, &enum_name_len) == MPI_SUCCESS)
        for (int i = 0; i < items; ++i) {
          int item_value = 0;
          char item[128];
          int item_len = sizeof(item);
          if (MPI_T_enum_get_item(enumtype, i, &item_value, item, &item_len) == MPI_SUCCESS && item_value == v)
            value = item;
        }
    }
  } else if (type == MPI_UNSIGNED && count == 1) {
    unsigned v = 0;
    if (MPI_T_cvar_read(handle, &v) == MPI_SUCCESS) value = std::to_string(v);
  } else if ((type == MPI_UNSIGNED_LONG || type == MPI_UNSIGNED_LONG_LONG) && count == 1) {
    unsigned long long v = 0;  // size_t parameters (eager limits): 8 bytes either way on LP64
    if (MPI_T_cvar_read(handle, &v) == MPI_SUCCESS) value = std::to_string(v);
  }
  MPI_T_cvar_handle_free(&handle);
  return value;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> transport_report() {
  require_initialized("mpi_transport");
  std::vector<std::pair<std::string, std::string>> out;
  std::string pml = openmpi_selected_pml();
  if (!pml.empty()) out.emplace_back("pml selected", pml);
  // Ask MPI_T for the level MPI already runs at: Open MPI 4.1 lowers the process's thread level
  // to whatever MPI_T_init_thread is given (Horovod then warns and may crash).
  int level = MPI_THREAD_SINGLE, provided = 0;
  MPI_Query_thread(&level);
  if (MPI_T_init_thread(level, &provided) != MPI_SUCCESS) return out;
  // Open MPI's selection knobs and shared-memory single-copy mechanism; MPICH's netmod/shm choices.
  for (const char* name : {"pml", "btl", "mtl", "btl_vader_single_copy_mechanism", "btl_sm_single_copy_mechanism",
                           "mpi_yield_when_idle", "btl_tcp_links", "btl_tcp_eager_limit",
                           "MPIR_CVAR_CH4_NETMOD", "MPIR_CVAR_CH4_SHM", "MPIR_CVAR_NEMESIS_NETMOD"}) {
    std::string value = read_cvar(name);
    if (!value.empty()) out.emplace_back(name, value);
  }
  MPI_T_finalize();
  return out;
}

}  // namespace hpclm::mpi
