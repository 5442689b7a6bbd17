// The thread count every OpenMP region of latentspace uses.
//
// Kept here rather than in OpenMP's global state because torch's libgomp is shared with
// ours in one process (shared/TOOLCHAIN.md): torch.set_num_threads must not change our
// count, so every region passes num_threads(num_threads()) explicitly.
#pragma once

namespace latentspace {

// Defaults, at first use, to OpenMP's own default: OMP_NUM_THREADS, else the processors this
// process may run on (whatever torch.set_num_threads did before); 1 in a process forked from
// one that loaded latentspace (threads.cpp says why).
int num_threads();
// Throws ValueError unless n >= 1.
void set_num_threads(int n);

}  // namespace latentspace
