#pragma once
// Where a training step's time goes, operator by operator, without a profiler library: LibTorch's
// RecordFunction callbacks time every outermost operator (forward ops and the autograd engine's
// backward nodes) between two device synchronisations. On a GPU an operator's figure is then the
// time of its kernels plus one synchronisation's latency (measured and reported, so it can be
// subtracted); the step runs slower while profiled, so this says where time goes, not how long
// the step takes. Nested operators (an aten::linear's aten::addmm) count towards the outermost.

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace bench {

/// Operator times of everything that runs while it lives (all threads, so the backward pass too).
///
/// Example:
/// @code
/// std::string report;
/// { bench::OpProfile profile(device); step(); report = profile.table(20); }
/// @endcode
class OpProfile {
 public:
  /// Starts timing operators; on CUDA each outermost one between synchronisations of `device`.
  explicit OpProfile(torch::Device device) {
    auto& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    TORCH_CHECK(!s.active, "OpProfile: one profile at a time");
    s.active = true;
    s.cuda = device.is_cuda();
    s.totals.clear();
    s.sync_ms = s.cuda ? sync_latency_ms() : 0.0;
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&on_start, &on_end));
    begin_ = Clock::now();
  }

  ~OpProfile() {
    at::removeCallback(handle_);
    std::lock_guard<std::mutex> lock(state().mutex);
    state().active = false;
  }

  OpProfile(const OpProfile&) = delete;
  OpProfile& operator=(const OpProfile&) = delete;

  /// The `top` operators by total time as a Markdown table (calls, total ms, share of the timed
  /// time), after a line with the totals and the synchronisation latency.
  std::string table(size_t top) const {
    auto& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    const double wall_ms = std::chrono::duration<double, std::milli>(Clock::now() - begin_).count();
    std::vector<std::pair<std::string, Total>> rows(s.totals.begin(), s.totals.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    double timed_ms = 0;
    int64_t calls = 0;
    for (const auto& [name, total] : rows) {
      timed_ms += total.ms;
      calls += total.calls;
    }
    std::string out = format("%lld outermost operator calls, %.1f ms timed in %.1f ms wall",
                             static_cast<long long>(calls), timed_ms, wall_ms);
    out += s.cuda ? format("; each call's time includes one device synchronisation (%.4f ms)\n\n", s.sync_ms)
                  : std::string("\n\n");
    out += "| operator | calls | ms | % of timed |\n|---|---|---|---|\n";
    for (size_t i = 0; i < std::min(top, rows.size()); ++i) {
      out += format("| %s | %lld | %.2f | %.1f |\n", rows[i].first.c_str(),
                    static_cast<long long>(rows[i].second.calls), rows[i].second.ms,
                    timed_ms > 0 ? 100.0 * rows[i].second.ms / timed_ms : 0.0);
    }
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;

  struct Total {
    int64_t calls = 0;
    double ms = 0;
  };

  struct State {
    std::mutex mutex;
    bool active = false;
    bool cuda = false;
    double sync_ms = 0;
    std::map<std::string, Total> totals;
  };

  // Carries an operator's start time from its start callback to its end callback.
  struct Started : at::ObserverContext {
    Clock::time_point time;
  };

  // The callbacks are plain function pointers, so the profile they fill is a single static one.
  static State& state() {
    static State s;
    return s;
  }

  // How many operators the calling thread is inside (only the outermost is timed).
  static int& depth() {
    thread_local int d = 0;
    return d;
  }

  template <typename... Args>
  static std::string format(const char* pattern, Args... args) {
    char line[512];
    std::snprintf(line, sizeof(line), pattern, args...);
    return line;
  }

  static void synchronize() {
    if (state().cuda) torch::cuda::synchronize();
  }

  // The median of a few empty synchronisations (after a first, which may initialise things).
  static double sync_latency_ms() {
    torch::cuda::synchronize();
    std::vector<double> times;
    for (int i = 0; i < 21; ++i) {
      const auto begin = Clock::now();
      torch::cuda::synchronize();
      times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - begin).count());
    }
    std::nth_element(times.begin(), times.begin() + 10, times.end());
    return times[10];
  }

  static std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
    if (depth()++ > 0) return nullptr;
    synchronize();  // what was queued before this operator is not its time
    auto started = std::make_unique<Started>();
    started->time = Clock::now();
    return started;
  }

  static void on_end(const at::RecordFunction& fn, at::ObserverContext* context) {
    if (--depth() > 0 || context == nullptr) return;
    synchronize();
    const double ms = std::chrono::duration<double, std::milli>(
                          Clock::now() - static_cast<Started*>(context)->time).count();
    auto& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto& total = s.totals[fn.name()];
    total.calls += 1;
    total.ms += ms;
  }

  at::CallbackHandle handle_ = 0;
  Clock::time_point begin_;
};

}  // namespace bench
