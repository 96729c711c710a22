#pragma once
/// @file program.hpp
/// @brief What ends a program: an error, printed as one line and exit status 1; or SIGINT /
/// SIGTERM, which a training run answers by saving a checkpoint at the end of its step and
/// stopping with status 128 + the signal, as a shell expects of an interrupted command.
///
/// Example (examples/train_style/main.cpp):
/// @code
/// return common::run_program("train_style", [&] { return train(flags, method); });
/// @endcode

#include <torch/torch.h>

#include <csignal>
#include <cstdio>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>

namespace common {

/// Thrown by a training run that stopped on a signal after saving its checkpoint.
class Interrupted : public std::runtime_error {
 public:
  /// `signal` is the signal's number; `message` says what was saved (empty: nothing to print,
  /// another process of the run says it).
  Interrupted(int signal, const std::string& message) : std::runtime_error(message), signal_(signal) {}
  /// The signal that stopped the run.
  int signal() const { return signal_; }

 private:
  int signal_;
};

namespace detail {
inline volatile std::sig_atomic_t pending_stop_signal = 0;
extern "C" inline void note_stop_signal(int signal) { pending_stop_signal = signal; }
}  // namespace detail

/// While it lives, SIGINT and SIGTERM do not kill the process but are noted, for the training
/// loop to stop at the end of its step (`pending`). A second signal of either kind kills at once,
/// as usual: the handler is installed for one delivery.
class StopSignals {
 public:
  StopSignals() {
    detail::pending_stop_signal = 0;
    struct sigaction action {};
    action.sa_handler = detail::note_stop_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    ::sigaction(SIGINT, &action, &previous_int_);
    ::sigaction(SIGTERM, &action, &previous_term_);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  ~StopSignals() {
    ::sigaction(SIGINT, &previous_int_, nullptr);
    ::sigaction(SIGTERM, &previous_term_, nullptr);
  }
  /// The signal received since construction, or 0.
  int pending() const { return detail::pending_stop_signal; }
  /// The signal's name: "SIGINT" or "SIGTERM".
  static const char* name(int signal) { return signal == SIGINT ? "SIGINT" : signal == SIGTERM ? "SIGTERM" : "a signal"; }

 private:
  struct sigaction previous_int_ {}, previous_term_ {};
};

/// Runs a program's `body` and returns its exit status: what `body` returns; 1 after printing an
/// error as one line `program: message` on stderr (a message that names the program already is
/// not prefixed twice); 128 + the signal after an `Interrupted` run, printing what it saved.
/// Standard output is line-buffered, also into a file or a pipe: a line such as "wrote x.png"
/// is there even when a signal ends the program.
inline int run_program(const std::string& program, const std::function<int()>& body) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  auto say = [&](const std::string& message) {
    std::fflush(stdout);
    const auto prefix = program + ": ";
    std::cerr << (message.rfind(prefix, 0) == 0 ? "" : prefix) << message << "\n";
  };
  try {
    return body();
  } catch (const Interrupted& e) {
    if (*e.what() != '\0') say(e.what());  // empty on the ranks other than 0, which says it
    return 128 + e.signal();
  } catch (const c10::Error& e) {
    say(e.what_without_backtrace());
  } catch (const std::exception& e) {
    say(e.what());
  }
  return 1;
}

}  // namespace common
