#pragma once
/// @file distributed.hpp
/// @brief Training on several processes the way PyTorch users do: LibTorch's c10d process groups
/// (Gloo on the CPU, NCCL on CUDA) joined through a `TCPStore`, with torchrun's conventions
/// (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). A world of one process has
/// no process group at all: the run is exactly the single-process one. `launch_local` is the
/// built-in launcher (`--nproc N`) for users without torchrun.
///
/// What a run does with it (examples/common/run.hpp): every rank checks that the others run the
/// same flags and trainable tensors (`check_same`), averages the trainable gradients before each
/// optimizer step (`gradient_hook`), agrees on the loss and on a pending signal (`sum`), and
/// rank 0 alone writes files while the others wait where they need them (`barrier`).

#include <common/flags.hpp>
#include <common/train_step.hpp>

#include <torch/torch.h>
#include <torch/version.h>

#if SCEDIT_WITH_C10D
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if SCEDIT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace common {

// ---- compat: LibTorch 1.13 vs 2.x c10d ------------------------------------------------------
// 1.13's ProcessGroupGloo / ProcessGroupNCCL derive from c10d::ProcessGroup; 2.x's derive from
// c10d::Backend (a ProcessGroup there dispatches to backends). Both keep the constructor
// (store, rank, size, options), `allreduce(std::vector<at::Tensor>&)` and `barrier()` returning
// `c10::intrusive_ptr<c10d::Work>`: the backend's type is the one difference the run sees.
namespace compat {
#if SCEDIT_WITH_C10D
#if TORCH_VERSION_MAJOR >= 2
using Backend = c10d::Backend;  ///< what a process group's backend is (2.x)
#else
using Backend = c10d::ProcessGroup;  ///< what a process group's backend is (1.13)
#endif
#endif
}  // namespace compat
// ---- end of compat ----------------------------------------------------------------------------

/// FNV-1a 64 of `bytes`, continuing `hash`: the same on every machine (std::hash is not promised
/// to be), for comparing what ranks hold.
inline uint64_t fnv1a(const void* bytes, size_t size, uint64_t hash = 0xcbf29ce484222325ULL) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  for (size_t i = 0; i < size; ++i) hash = (hash ^ p[i]) * 0x100000001b3ULL;
  return hash;
}

/// The process group of a training run; inactive (no store, no group) in a world of one.
class Distributed {
 public:
  /// A world of one process.
  Distributed() = default;

  /// Joins the world that `flags` and the environment describe, on `device` (Gloo on the CPU,
  /// NCCL on CUDA). A world of one joins nothing.
  Distributed(const DistributedFlags& flags, const torch::Device& device) {
    rank_ = flags.rank >= 0 ? flags.rank : env_int("RANK", 0);
    world_ = world_size_of(flags);
    local_rank_ = env_int("LOCAL_RANK", rank_);
    TORCH_CHECK(world_ >= 1 && rank_ >= 0 && rank_ < world_, "--rank / RANK ", rank_,
                " is not in a world of ", world_, " processes (--world-size / WORLD_SIZE)");
    TORCH_CHECK(flags.timeout > 0, "--dist-timeout must be positive, got ", flags.timeout);
    if (world_ == 1) return;
    const char* addr_env = std::getenv("MASTER_ADDR");
    const std::string addr = !flags.master_addr.empty() ? flags.master_addr
                             : addr_env != nullptr     ? std::string(addr_env)
                                                       : std::string("127.0.0.1");
    const int64_t port = flags.master_port > 0 ? flags.master_port : env_int("MASTER_PORT", 29500);
    TORCH_CHECK(port > 0 && port < 65536, "--master-port / MASTER_PORT ", port, " is not a TCP port");
#if SCEDIT_WITH_C10D
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(flags.timeout * 1000));
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = rank_ == 0;
    options.numWorkers = static_cast<size_t>(world_);
    options.waitWorkers = true;
    options.timeout = timeout;
    try {
      store_ = c10::make_intrusive<c10d::TCPStore>(addr, options);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "rank ", rank_, " of ", world_, ": no rendezvous at ", addr, ":", port,
                  " within --dist-timeout ", flags.timeout, " s (is every rank started, MASTER_ADDR/PORT "
                  "the same?): ", e.what());
    }
    if (device.is_cuda()) {
#if SCEDIT_WITH_NCCL
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = timeout;
      group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, rank_, world_, nccl);
#else
      TORCH_CHECK(false, "training on CUDA with ", world_, " processes needs NCCL: this build's "
                  "LibTorch has no ProcessGroupNCCL");
#endif
    } else {
      auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
      gloo->devices.push_back(interface != nullptr ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                              : is_loopback(addr) ? c10d::ProcessGroupGloo::createDeviceForHostname(addr)
                                                  : c10d::ProcessGroupGloo::createDefaultDevice());
      gloo->threads = 2;
      group_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store_, rank_, world_, gloo);
    }
#else
    (void)device;
    TORCH_CHECK(false, "a world of ", world_, " processes needs c10d: this build's LibTorch lacks "
                "torch/csrc/distributed/c10d or the gloo headers (install libgloo-dev and reconfigure)");
#endif
  }

  /// The number of processes that `flags` and the environment describe (--world-size, else
  /// `WORLD_SIZE`, else 1), known before joining them.
  static int64_t world_size_of(const DistributedFlags& flags) {
    return flags.world_size > 0 ? flags.world_size : env_int("WORLD_SIZE", 1);
  }

  /// This process's rank.
  int64_t rank() const { return rank_; }
  /// The number of processes.
  int64_t world_size() const { return world_; }
  /// This process's rank on its machine (`LOCAL_RANK`): its GPU.
  int64_t local_rank() const { return local_rank_; }
  /// Whether there is more than one process (and so a process group).
  bool active() const { return world_ > 1; }
  /// Whether this process writes the run's files (rank 0).
  bool is_main() const { return rank_ == 0; }

  /// Waits until every rank is here (nothing in a world of one).
  void barrier() {
#if SCEDIT_WITH_C10D
    if (active()) wait(group_->barrier(), "a barrier");
#endif
  }

  /// Refuses, naming the ranks, when another rank's `description` of `what` differs from rank
  /// 0's (compared by hash through the store).
  void check_same(const std::string& what, const std::string& description) {
    check_same_hash(what, fnv1a(description.data(), description.size()));
  }

  /// `check_same` of the bytes of `tensors` (their values, bitwise).
  void check_same(const std::string& what, const std::vector<torch::Tensor>& tensors) {
    if (!active()) return;
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (const auto& t : tensors) {
      const auto host = t.detach().to(torch::kCPU).contiguous();
      hash = fnv1a(host.data_ptr(), host.numel() * host.element_size(), hash);
    }
    check_same_hash(what, hash);
  }

  /// The sums over ranks of `values` (float64), the same on every rank; `values` in a world of one.
  std::vector<double> sum(std::vector<double> values) {
#if SCEDIT_WITH_C10D
    if (!active()) return values;
    auto tensor = torch::tensor(values, torch::kFloat64).to(device_of_group());
    std::vector<torch::Tensor> tensors{tensor};
    wait(group_->allreduce(tensors), "summing the loss");
    tensor = tensors[0].cpu();
    for (size_t i = 0; i < values.size(); ++i) values[i] = tensor[static_cast<int64_t>(i)].item<double>();
#endif
    return values;
  }

  /// The gradient hook of `TrainStep` that averages the trainable gradients over the ranks:
  /// flattened into buckets of about `bucket_bytes`, one all-reduce each, all started before the
  /// first is waited for. (Overlap with the backward pass is not done yet: the reduction starts
  /// once the backward pass is complete.)
  GradientHook gradient_hook(int64_t bucket_bytes = int64_t{25} << 20) {
    return [this, bucket_bytes](const std::vector<torch::Tensor>& parameters) {
      average_gradients(parameters, bucket_bytes);
    };
  }

  /// Averages the gradients of `parameters` over the ranks in place (see `gradient_hook`). A
  /// parameter without a gradient takes part with zeros, so that every rank sends the same layout.
  void average_gradients(const std::vector<torch::Tensor>& parameters, int64_t bucket_bytes) {
#if SCEDIT_WITH_C10D
    if (!active()) return;
    torch::NoGradGuard no_grad;
    struct Bucket {
      std::vector<torch::Tensor> grads;
      std::vector<torch::Tensor> flat;  // one tensor: what the all-reduce works on
      c10::intrusive_ptr<c10d::Work> work;
    };
    std::vector<Bucket> buckets;
    int64_t bytes = 0;
    for (const auto& p : parameters) {
      auto& grad = p.mutable_grad();
      if (!grad.defined()) grad = torch::zeros_like(p);
      const int64_t size = grad.numel() * grad.element_size();
      const bool fits = !buckets.empty() && bytes + size <= bucket_bytes &&
                        buckets.back().grads.front().scalar_type() == grad.scalar_type();
      if (!fits) {
        buckets.emplace_back();
        bytes = 0;
      }
      buckets.back().grads.push_back(grad);
      bytes += size;
    }
    for (auto& bucket : buckets) {
      std::vector<torch::Tensor> flat;
      for (const auto& g : bucket.grads) flat.push_back(g.reshape({-1}));
      bucket.flat = {torch::cat(flat)};
      bucket.work = group_->allreduce(bucket.flat);
    }
    for (auto& bucket : buckets) {
      wait(bucket.work, "averaging the gradients");
      auto flat = bucket.flat[0].div_(static_cast<double>(world_));
      int64_t offset = 0;
      for (auto& g : bucket.grads) {
        g.copy_(flat.narrow(0, offset, g.numel()).view_as(g));
        offset += g.numel();
      }
    }
#else
    (void)parameters;
    (void)bucket_bytes;
#endif
  }

 private:
  // The integer in environment variable `name`, else `fallback`; refuses one that is not an integer.
  static int64_t env_int(const char* name, int64_t fallback) {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') return fallback;
    char* end = nullptr;
    const long long parsed = std::strtoll(value, &end, 10);
    TORCH_CHECK(end != nullptr && *end == '\0', "environment variable ", name, "='", value, "' is not an integer");
    return parsed;
  }

  // Whether `addr` is this machine's loopback, where Gloo binds to that address itself.
  static bool is_loopback(const std::string& addr) {
    return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
  }

  // check_same of a hash: each rank puts its own under a key of this check, then reads everyone's.
  void check_same_hash(const std::string& what, uint64_t hash) {
#if SCEDIT_WITH_C10D
    if (!active()) return;
    const std::string prefix = "scedit/check/" + std::to_string(checks_++) + "/";
    const auto mine = std::to_string(hash);
    store_->set(prefix + std::to_string(rank_), std::vector<uint8_t>(mine.begin(), mine.end()));
    std::map<std::string, std::vector<int64_t>> ranks_by_hash;
    std::string first;
    for (int64_t r = 0; r < world_; ++r) {
      std::vector<uint8_t> bytes;
      try {
        bytes = store_->get(prefix + std::to_string(r));
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "rank ", r, " did not report ", what, " within --dist-timeout: ", e.what());
      }
      const std::string theirs(bytes.begin(), bytes.end());
      if (r == 0) first = theirs;
      ranks_by_hash[theirs].push_back(r);
    }
    if (ranks_by_hash.size() == 1) return;
    std::string differ;
    for (const auto& [h, ranks] : ranks_by_hash) {
      if (h == first) continue;
      for (const auto r : ranks) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    }
    TORCH_CHECK(false, what, " differ across the ", world_, " processes: rank(s) ", differ,
                " do not match rank 0 (every process must run with the same flags and model)");
#else
    (void)what;
    (void)hash;
#endif
  }

#if SCEDIT_WITH_C10D
  // Where the group's collectives take their tensors: the rank's GPU for NCCL, else the CPU.
  torch::Device device_of_group() const {
    return group_->getBackendName() == "nccl" ? torch::Device(torch::kCUDA, static_cast<int>(local_rank_))
                                              : torch::Device(torch::kCPU);
  }

  // Waits for `work`, turning c10d's error (a rank gone, the timeout) into one naming this rank.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* doing) {
    try {
      work->wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "rank ", rank_, " of ", world_, ": ", doing, " failed (another rank stopped, "
                  "or took longer than --dist-timeout): ", e.what());
    }
  }

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<compat::Backend> group_;
#endif
  int64_t rank_ = 0, world_ = 1, local_rank_ = 0;
  int64_t checks_ = 0;  // check_same calls so far: each compares under keys of its own
};

/// A free TCP port on 127.0.0.1 (asked of the kernel), for a local world's rendezvous.
inline int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "--nproc: cannot open a socket to find a free port");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  ::close(fd);
  TORCH_CHECK(ok, "--nproc: cannot find a free port on 127.0.0.1");
  return ntohs(address.sin_port);
}

/// The built-in launcher: with `nproc` > 1 (and no `RANK` in the environment: not launched
/// already), starts `nproc` - 1 copies of this program with `argv` and torchrun's environment
/// (ranks 1…, `MASTER_ADDR` 127.0.0.1, a free `MASTER_PORT`), runs `body` as rank 0, and waits for
/// them. When a copy fails, the others are stopped and this process exits non-zero, naming it.
/// Returns `body`'s status, or 1 when a copy failed.
inline int launch_local(int64_t nproc, char** argv, const std::function<int()>& body) {
  if (nproc <= 1 || std::getenv("RANK") != nullptr) return body();
  const auto port = std::to_string(free_local_port());
  const auto world = std::to_string(nproc);
  ::setenv("WORLD_SIZE", world.c_str(), 1);
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", port.c_str(), 1);
  std::fflush(stdout);
  std::map<pid_t, int64_t> children;
  for (int64_t r = 1; r < nproc; ++r) {
    const pid_t pid = ::fork();
    TORCH_CHECK(pid >= 0, "--nproc: cannot start rank ", r);
    if (pid == 0) {
      const auto rank = std::to_string(r);
      ::setenv("RANK", rank.c_str(), 1);
      ::setenv("LOCAL_RANK", rank.c_str(), 1);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // rank 0 gone: so is the run
      ::execv("/proc/self/exe", argv);
      std::perror("--nproc: exec");
      std::_Exit(127);
    }
    children[pid] = r;
  }
  ::setenv("RANK", "0", 1);
  ::setenv("LOCAL_RANK", "0", 1);
  std::atomic<bool> finishing{false};
  std::atomic<bool> failed{false};
  auto stop_children = [&] {
    for (const auto& child : children) ::kill(child.first, SIGTERM);
  };
  // Watches the copies: one that fails stops the run at once, rather than leaving the others
  // to wait for it until --dist-timeout.
  std::thread watcher([&] {
    for (size_t left = children.size(); left > 0; --left) {
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, 0);
      if (pid < 0) break;
      const auto it = children.find(pid);
      if (it == children.end()) continue;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (ok || finishing) {
        failed = failed || !ok;
        continue;
      }
      std::fflush(stdout);
      std::fprintf(stderr, "--nproc: rank %lld %s %d: stopping the run\n", static_cast<long long>(it->second),
                   WIFEXITED(status) ? "exited with status" : "was killed by signal",
                   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
      stop_children();
      std::_Exit(1);
    }
  });
  int status = 0;
  try {
    status = body();
  } catch (...) {
    finishing = true;
    stop_children();
    watcher.join();
    throw;
  }
  if (status != 0) {
    finishing = true;
    stop_children();
  }
  watcher.join();
  return status != 0 ? status : failed ? 1 : 0;
}

}  // namespace common
