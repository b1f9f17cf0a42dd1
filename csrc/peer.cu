// Device-side barrier of the ranks sharing a peer workspace (lpdist/comm/peer.py).
//
// Each rank's workspace starts with one 32-bit flag per rank. At barrier number `epoch` (1, 2,
// ... counted alike on every rank) rank r stores `epoch` into flag r of every other rank's
// workspace (a release store at system scope, after a system-wide fence: whatever this stream
// wrote before, into local or peer memory, is visible to a rank that sees the flag) and then
// waits until each other rank's flag in its own workspace has reached `epoch` (acquire loads).
// Work queued on the stream after the barrier therefore starts only when every rank has
// finished everything it queued before it. Flags only grow, so a late rank's store is never
// lost; the comparison is on the wrapped difference.
//
// A rank that never arrives (it crashed, or took another code path) would hang the stream: after
// `timeout_ns` of waiting the kernel traps, which fails the process's CUDA context with a launch
// error instead of hanging forever.

typedef long long i64;

__device__ __forceinline__ void store_release_sys(unsigned* p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned load_acquire_sys(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// One thread per rank; base[d] is rank d's workspace as mapped into this process.
extern "C" __global__ void peer_barrier(const i64* base, int rank, int world, unsigned epoch,
                                        unsigned long long timeout_ns) {
    const int peer = threadIdx.x;
    if (peer >= world || peer == rank) return;
    __threadfence_system();
    store_release_sys(reinterpret_cast<unsigned*>(base[peer]) + rank, epoch);
    const unsigned* mine = reinterpret_cast<const unsigned*>(base[rank]) + peer;
    const unsigned long long start = now_ns();
    while (static_cast<int>(load_acquire_sys(mine) - epoch) < 0) {
        if (now_ns() - start > timeout_ns) __trap();
        __nanosleep(64);
    }
}
