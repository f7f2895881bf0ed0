// The main() of a kernel executable built by kvlib.gpu.host: read one launch, run it, write
// the buffers back.
//
// Launch file (little-endian): "KVH1", u32 name length, name, u32 grid[3], u32 block[3],
// u64 dynamic shared bytes, u32 order, u32 argument count, then per argument a u8 kind
// (0 buffer, 1 int32, 2 float32, 3 int64) and, for a buffer, u64 bytes and the bytes, for a
// scalar 8 bytes (the value in the low bytes). Output file: every buffer's bytes, in order.
// Each buffer is its own heap allocation of exactly its size (256-byte aligned, as cudaMalloc),
// so AddressSanitizer reports a byte read or written past it.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

namespace kvhost {

struct Args {
    std::string name;
    dim3 grid, block;
    uint64_t smem = 0;
    uint32_t order = 0;
    std::vector<uint8_t> kind;
    std::vector<void*> buf;
    std::vector<uint64_t> bytes;
    std::vector<uint64_t> scalar;

    void expect(const char* kinds) const {  // one letter per argument: p, i, f, l
        static const char letter[] = "pifl";
        size_t n = strlen(kinds);
        bool ok = n == kind.size();
        for (size_t i = 0; ok && i < n; ++i) ok = letter[kind[i]] == kinds[i];
        if (!ok) {
            std::string got;
            for (uint8_t k : kind) got += letter[k];
            g_kernel = name;
            fail("arguments of kinds '%s', expected '%s' (p buffer, i int32, f float32, l int64)",
                 got.c_str(), kinds);
        }
    }
    void* ptr(int i) const { return buf[i]; }
    int32_t i32(int i) const {
        int32_t v;
        memcpy(&v, &scalar[i], 4);
        return v;
    }
    float f32(int i) const {
        float v;
        memcpy(&v, &scalar[i], 4);
        return v;
    }
    int64_t i64(int i) const {
        int64_t v;
        memcpy(&v, &scalar[i], 8);
        return v;
    }
};

inline void read_exact(FILE* f, void* dst, size_t n) {
    if (n && fread(dst, 1, n, f) != n) {
        fprintf(stderr, "kvhost: truncated launch file\n");
        exit(2);
    }
}

inline Args read_launch(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvhost: cannot open %s\n", path);
        exit(2);
    }
    Args a;
    char magic[4];
    read_exact(f, magic, 4);
    if (memcmp(magic, "KVH1", 4)) {
        fprintf(stderr, "kvhost: %s is not a launch file\n", path);
        exit(2);
    }
    uint32_t len;
    read_exact(f, &len, 4);
    a.name.resize(len);
    read_exact(f, a.name.data(), len);
    uint32_t dims[6];
    read_exact(f, dims, sizeof dims);
    a.grid = {dims[0], dims[1], dims[2]};
    a.block = {dims[3], dims[4], dims[5]};
    read_exact(f, &a.smem, 8);
    read_exact(f, &a.order, 4);
    uint32_t n;
    read_exact(f, &n, 4);
    for (uint32_t i = 0; i < n; ++i) {
        uint8_t k;
        read_exact(f, &k, 1);
        if (k > 3) {
            fprintf(stderr, "kvhost: argument %u has unknown kind %u\n", i, k);
            exit(2);
        }
        a.kind.push_back(k);
        uint64_t v = 0;
        void* p = nullptr;
        if (k == 0) {
            read_exact(f, &v, 8);
            if (posix_memalign(&p, 256, v ? v : 1)) {
                fprintf(stderr, "kvhost: out of memory\n");
                exit(2);
            }
            read_exact(f, p, v);
        } else {
            read_exact(f, &v, 8);
        }
        a.buf.push_back(p);
        a.bytes.push_back(k == 0 ? v : 0);
        a.scalar.push_back(k == 0 ? 0 : v);
    }
    fclose(f);
    return a;
}

inline void write_buffers(const Args& a, const char* path) {
    FILE* f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "kvhost: cannot write %s\n", path);
        exit(2);
    }
    for (size_t i = 0; i < a.kind.size(); ++i)
        if (a.kind[i] == 0 && a.bytes[i] && fwrite(a.buf[i], 1, a.bytes[i], f) != a.bytes[i])
            exit(2);
    fclose(f);
    for (void* p : a.buf) free(p);
}

}  // namespace kvhost

bool kvhost_dispatch(const kvhost::Args& a);  // generated: runs the kernel a.name

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LAUNCH_FILE OUTPUT_FILE\n", argv[0]);
        return 2;
    }
    kvhost::Args a = kvhost::read_launch(argv[1]);
    if (!kvhost_dispatch(a)) {
        fprintf(stderr, "kvhost: no kernel named %s in this source\n", a.name.c_str());
        return 2;
    }
    kvhost::write_buffers(a, argv[2]);
    return 0;
}
