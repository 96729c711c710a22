// The minimal use of the installed library: an SC-Tuner on a 320-channel skip.
#include <scedit/sctuner.hpp>

#include <iostream>

int main() {
  scedit::SCTuner tuner(scedit::SCTunerOptions(320));
  auto x = torch::randn({1, 320, 4, 4});
  const bool identity = torch::equal(tuner(x), x);
  std::cout << (identity ? "consumer: SC-Tuner is the identity at init" : "consumer: FAILED") << "\n";
  return identity ? 0 : 1;
}
