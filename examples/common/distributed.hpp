#pragma once
/// @file distributed.hpp
/// @brief Training on several processes the way PyTorch users do: LibTorch's c10d process groups
/// (Gloo on the CPU, NCCL on CUDA) joined through a `TCPStore`, with torchrun's conventions
/// (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). A world of one process has
/// no process group at all: the run is exactly the single-process one. The built-in launcher
/// (`--nproc N`) is examples/common/launcher.hpp.
///
/// What a run does with it (examples/common/run.hpp): every rank checks that the others run the
/// same flags and trainable tensors (`check_same`), averages the trainable gradients during and
/// after the backward pass (examples/common/gradient_reducer.hpp, through `start_sum`), agrees on
/// the loss and on a pending signal (`sum`), and rank 0 alone writes files while the others wait
/// where they need them (`barrier`).
///
/// Failures: every collective and the rendezvous give up after `--dist-timeout`. Each rank's
/// heartbeat (a thread counting in the store, with the step the rank is at) then tells which
/// rank is gone or hung, and the error names it.

#include <common/flags.hpp>

#include <torch/torch.h>
#include <torch/version.h>

#if SCEDIT_WITH_C10D
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if SCEDIT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
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
#if SCEDIT_WITH_C10D
using Work = c10::intrusive_ptr<c10d::Work>;  ///< a collective under way
#else
struct Work {};  ///< no collectives without c10d (a world of one never starts one)
#endif
// ---- end of compat ----------------------------------------------------------------------------

/// The message of `e` without the backtrace LibTorch's own errors carry.
inline std::string message_of(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) return error->what_without_backtrace();
  return e.what();
}

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
  Distributed(const Distributed&) = delete;
  Distributed& operator=(const Distributed&) = delete;
  ~Distributed() { stop_heartbeat(); }

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
    addr_ = addr;
    timeout_ = timeout;
    port_ = static_cast<uint16_t>(port);
    beat_ = std::chrono::milliseconds(std::clamp<int64_t>(timeout.count() / 10, 200, 2000));
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
                  "the same?): ", message_of(e));
    }
#if !SCEDIT_WITH_NCCL
    TORCH_CHECK(!device.is_cuda(), "training on CUDA with ", world_, " processes needs NCCL: this build's "
                "LibTorch has no ProcessGroupNCCL");
#endif
    try {  // the group's own rendezvous through the store: every rank must come
      if (device.is_cuda()) {
#if SCEDIT_WITH_NCCL
        auto nccl = c10d::ProcessGroupNCCL::Options::create();
        nccl->timeout = timeout;
        group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, rank_, world_, nccl);
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
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "rank ", rank_, " of ", world_, ": the other ranks did not all join at ", addr, ":",
                  port, " within --dist-timeout ", flags.timeout, " s (is every rank started, with the same "
                  "--world-size / WORLD_SIZE, MASTER_ADDR and MASTER_PORT?): ", message_of(e));
    }
    start_heartbeat();
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

  /// Starts summing `tensor` over the ranks, in place (on the rank's GPU for NCCL, else on the
  /// CPU); `wait` completes it. Every rank must start the same sums in the same order.
  Work start_sum(torch::Tensor& tensor) {
#if SCEDIT_WITH_C10D
    std::vector<torch::Tensor> tensors{tensor};
    return group_->allreduce(tensors);
#else
    (void)tensor;
    TORCH_CHECK(false, "Distributed::start_sum: no c10d in this build");
#endif
  }

  /// Waits for `work`; when it fails (a rank gone, or --dist-timeout passed) the error says
  /// what this rank was `doing` and which rank is gone or hung.
  void wait(const Work& work, const char* doing) {
#if SCEDIT_WITH_C10D
    try {
      work->wait();
    } catch (const std::exception& e) {
      const std::string why = e.what();
      TORCH_CHECK(false, "rank ", rank_, " of ", world_, ": ", doing, " failed: ", missing_ranks(),
                  " (c10d: ", why.substr(0, why.find('\n')), ")");
    }
#else
    (void)work;
    (void)doing;
#endif
  }

  /// Rank 0's `value`, on every rank (through the store): how ranks agree on what rank 0 chose.
  std::string share(const std::string& what, const std::string& value) {
#if SCEDIT_WITH_C10D
    if (!active()) return value;
    const std::string key = "scedit/share/" + std::to_string(shares_++);
    if (is_main()) store_->set(key, std::vector<uint8_t>(value.begin(), value.end()));
    try {
      const auto bytes = store_->get(key);
      return std::string(bytes.begin(), bytes.end());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "rank ", rank_, ": rank 0 did not share ", what, " within --dist-timeout: ", message_of(e));
    }
#endif
    return value;
  }

  /// Tells the heartbeat the training step this rank is at (for naming a rank left behind).
  void set_step(int64_t step) { step_ = step; }

 private:
  // ---- liveness ------------------------------------------------------------------------------
  // A thread of each rank writes "<beats> <step>" under scedit/alive/<rank> every beat (a tenth
  // of --dist-timeout, 0.2 to 2 s), through a store connection of its own: a rank that is gone,
  // or stopped, no longer counts.
  void start_heartbeat() {
#if SCEDIT_WITH_C10D
    auto client = connect(beat_ * 3);
    heartbeat_ = std::thread([this, client] {
      const std::string key = "scedit/alive/" + std::to_string(rank_);
      for (int64_t beats = 1;; ++beats) {
        const auto value = std::to_string(beats) + " " + std::to_string(step_.load());
        try {
          client->set(key, std::vector<uint8_t>(value.begin(), value.end()));
        } catch (const std::exception&) {
          return;  // the store is gone with rank 0: the next collective says so
        }
        std::unique_lock<std::mutex> lock(beat_mutex_);
        if (beat_stop_.wait_for(lock, beat_, [this] { return stopping_; })) return;
      }
    });
#endif
  }

  void stop_heartbeat() {
    {
      std::lock_guard<std::mutex> lock(beat_mutex_);
      stopping_ = true;
    }
    beat_stop_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
  }

  // Which ranks are gone or hung: the heartbeats read now and again after 2.5 beats; a rank whose
  // count did not move is named, else one left behind at an earlier step.
  std::string missing_ranks() {
#if SCEDIT_WITH_C10D
    try {
      auto probe = connect(beat_ * 2);
      auto read = [&] {
        std::vector<std::pair<int64_t, int64_t>> beats_and_steps(static_cast<size_t>(world_), {-1, -1});
        for (int64_t r = 0; r < world_; ++r) {
          const std::string key = "scedit/alive/" + std::to_string(r);
          if (!probe->check({key})) continue;
          const auto bytes = probe->get(key);
          std::istringstream in(std::string(bytes.begin(), bytes.end()));
          in >> beats_and_steps[static_cast<size_t>(r)].first >> beats_and_steps[static_cast<size_t>(r)].second;
        }
        return beats_and_steps;
      };
      const auto before = read();
      std::this_thread::sleep_for(beat_ * 5 / 2);
      const auto after = read();
      std::string silent, behind;
      for (int64_t r = 0; r < world_; ++r) {
        if (r == rank_) continue;
        const auto& [beats, step] = after[static_cast<size_t>(r)];
        if (beats == before[static_cast<size_t>(r)].first) {
          silent += (silent.empty() ? "" : ", ") + std::to_string(r);
        } else if (step < step_) {
          behind += (behind.empty() ? "" : ", ") + std::to_string(r) + " (at step " + std::to_string(step) + ")";
        }
      }
      if (!silent.empty()) return "rank " + silent + " is gone or hung (no heartbeat)";
      if (!behind.empty()) return "rank " + behind + " is alive but behind this rank's step " + std::to_string(step_.load());
      return "every rank still has a heartbeat (a collective took longer than --dist-timeout?)";
    } catch (const std::exception&) {
      return "rank 0 is gone or hung (its rendezvous store at " + addr_ + ":" + std::to_string(port_) +
             " does not answer)";
    }
#else
    return "";
#endif
  }

#if SCEDIT_WITH_C10D
  // A connection of its own to rank 0's store, whose operations give up after `timeout`.
  c10::intrusive_ptr<c10d::TCPStore> connect(std::chrono::milliseconds timeout) const {
    c10d::TCPStoreOptions options;
    options.port = port_;
    options.isServer = false;
    options.waitWorkers = false;
    options.timeout = timeout;
    return c10::make_intrusive<c10d::TCPStore>(addr_, options);
  }
#endif

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
        TORCH_CHECK(false, "rank ", r, " did not report ", what, " within --dist-timeout: ", message_of(e));
      }
      const std::string theirs(bytes.begin(), bytes.end());
      if (r == 0) first = theirs;
      ranks_by_hash[theirs].push_back(r);
    }
    // The store lives in rank 0: it leaves only once every rank has read (a check can be the
    // run's last word).
    store_->add(prefix + "read", 1);
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    while (is_main() && store_->add(prefix + "read", 0) < world_ && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
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

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<compat::Backend> group_;
#endif
  int64_t rank_ = 0, world_ = 1, local_rank_ = 0;
  int64_t checks_ = 0;  // check_same calls so far: each compares under keys of its own
  int64_t shares_ = 0;  // share calls so far: each under a key of its own
  std::string addr_;    // rank 0's store
  uint16_t port_ = 0;
  std::chrono::milliseconds timeout_{300000};  // --dist-timeout
  std::chrono::milliseconds beat_{1000};
  std::atomic<int64_t> step_{0};
  std::thread heartbeat_;
  std::mutex beat_mutex_;
  std::condition_variable beat_stop_;
  bool stopping_ = false;
};

}  // namespace common
