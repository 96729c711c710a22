#pragma once
// How many threads a run on the CPU computes with. LibTorch counts cores through cpuinfo, which
// on some virtual machines (this project's CI machines among them) reads two cores as one core
// with two SMT threads and computes on one of them; nor does it look at the process's affinity
// mask or a container's CPU quota. Linux's own topology says what the process may use.

#include <torch/torch.h>

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

namespace common {

/// The physical cores this process may run on: the CPUs of its affinity mask counted once per
/// core (two SMT threads of one core are one), from Linux's topology
/// (`/sys/devices/system/cpu/cpuN/topology`), and no more than its cgroup's CPU quota
/// (`/sys/fs/cgroup/cpu.max`, rounded up) allows. 0 where the topology cannot be read. `sysfs` is
/// where those files are read (tests give a folder of their own).
inline int64_t cpu_cores_available(const std::string& sysfs = "/sys") {
#if defined(__linux__)
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return 0;
  std::set<std::pair<int64_t, int64_t>> cores;  // (package, core)
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    const std::string topology = sysfs + "/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    int64_t package = -1, core = -1;
    std::ifstream(topology + "physical_package_id") >> package;
    std::ifstream(topology + "core_id") >> core;
    if (package < 0 || core < 0) return 0;
    cores.emplace(package, core);
  }
  auto available = static_cast<int64_t>(cores.size());
  std::ifstream cpu_max(sysfs + "/fs/cgroup/cpu.max");  // "max 100000", or "<quota> <period>" in µs
  std::string quota;
  int64_t period = 0;
  if (cpu_max >> quota >> period && quota != "max" && period > 0) {
    const int64_t microseconds = std::atoll(quota.c_str());
    if (microseconds > 0) available = std::min(available, std::max<int64_t>(1, (microseconds + period - 1) / period));
  }
  return available;
#else
  (void)sysfs;
  return 0;
#endif
}

/// Whether the user chose LibTorch's number of threads: `OMP_NUM_THREADS` or `MKL_NUM_THREADS`
/// is set (LibTorch reads them itself).
inline bool cpu_threads_set_by_user() {
  return std::getenv("OMP_NUM_THREADS") != nullptr || std::getenv("MKL_NUM_THREADS") != nullptr;
}

/// Gives a run on the CPU one intra-op thread per physical core it may use
/// (`cpu_cores_available`), shared among the processes of a multi-process run on this machine
/// (`LOCAL_WORLD_SIZE`, which torchrun and `--nproc` set). Threads the user chose
/// (`cpu_threads_set_by_user`) are left alone, and so is LibTorch's choice where the topology
/// cannot be read. On this project's CI machines it is the difference between one core and two
/// (bench/RESULTS.md v0.12).
inline void use_cpu_cores() {
  if (cpu_threads_set_by_user()) return;
  const int64_t cores = cpu_cores_available();
  if (cores == 0) return;
  const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
  const int64_t processes = std::max<int64_t>(1, local_world ? std::atoll(local_world) : 1);
  at::set_num_threads(static_cast<int>(std::max<int64_t>(1, cores / processes)));
}

}  // namespace common
