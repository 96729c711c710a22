#pragma once
/// @file scedit.hpp
/// @brief Everything of the library in one include.

#include <scedit/compat.hpp>
#include <scedit/checkpoint.hpp>
#include <scedit/csctuner.hpp>
#include <scedit/foreach_adamw.hpp>
#include <scedit/lora.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/sites.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tensor_file.hpp>
#include <scedit/torch_pickle.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>
