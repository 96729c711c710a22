#pragma once
/// @file launcher.hpp
/// @brief The built-in launcher of a multi-process run (`--nproc N`), for users without torchrun:
/// it starts the other ranks as copies of this program with torchrun's environment
/// (examples/common/distributed.hpp reads it) and stops the run when one of them fails.

#include <torch/torch.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>

namespace common {

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

/// Set in the environment of the ranks `launch_local` starts, which read the same `--nproc`.
constexpr const char* kLaunchedByNproc = "SCEDIT_LAUNCHED_BY_NPROC";

/// Refuses, before any process starts, a launch that contradicts itself: `--nproc` (`nproc` > 1)
/// with `--rank` (`rank` >= 0) or another `--world-size`, or under a launcher such as torchrun
/// that has set `RANK` already. Each would wait for ranks that never come.
inline void check_launch(int64_t nproc, int64_t rank, int64_t world_size) {
  if (nproc <= 1) return;
  TORCH_CHECK(rank < 0, "--nproc ", nproc, " starts ranks 0 to ", nproc - 1, " itself: give --nproc or --rank, not both");
  TORCH_CHECK(world_size <= 0 || world_size == nproc, "--nproc ", nproc, " with --world-size ", world_size,
              ": --nproc starts the whole world on this machine (leave --world-size out)");
  const char* launched = std::getenv("RANK");
  TORCH_CHECK(launched == nullptr || std::getenv(kLaunchedByNproc) != nullptr, "--nproc ", nproc, " under a "
              "launcher that started this process as RANK ", launched, " (torchrun?): let one of them start the "
              "processes");
}

/// The built-in launcher: with `nproc` > 1 (and no `RANK` in the environment: not launched
/// already), starts `nproc` - 1 copies of this program with `argv` and torchrun's environment
/// (ranks 1…, `LOCAL_WORLD_SIZE` `nproc`, `MASTER_ADDR` 127.0.0.1, a free `MASTER_PORT`), runs
/// `body` as rank 0, and waits for them. When a copy fails, the others are stopped and this
/// process exits non-zero, naming it.
/// Returns `body`'s status, or 1 when a copy failed.
inline int launch_local(int64_t nproc, char** argv, const std::function<int()>& body) {
  if (nproc <= 1 || std::getenv("RANK") != nullptr) return body();
  const auto port = std::to_string(free_local_port());
  const auto world = std::to_string(nproc);
  ::setenv("WORLD_SIZE", world.c_str(), 1);
  ::setenv("LOCAL_WORLD_SIZE", world.c_str(), 1);  // the ranks share this machine's cores (cpu_threads.hpp)
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
      ::setenv(kLaunchedByNproc, "1", 1);
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
