/* vdisk native core: zero detection and positional I/O loops for the copy paths.
 *
 * Contract shared by every function here:
 *   - arguments have been validated by vdisk/native.py (lengths, offsets, fds); C only checks what it
 *     must to stay memory-safe;
 *   - buffers belong to the caller and are never copied or retained;
 *   - the return value is 0 on success or -errno on failure;
 *   - nothing allocates on the heap; scratch space is on the stack or passed in by the caller;
 *   - nothing touches Python: cffi releases the GIL around every call.
 *
 * VDISK_COPIER_VERSION is the stamp vdisk/native.py compares against its own constant
 * (native.EXPECTED_VERSION) to refuse a stale build.  Bump both together on every change to the
 * signatures or the behaviour of this interface.
 */
#ifndef VDISK_COPIER_H
#define VDISK_COPIER_H

#include <stddef.h>
#include <stdint.h>

#define VDISK_COPIER_VERSION 1

int vdisk_version(void);

int vdisk_zero_map(const uint8_t *buf, size_t len, size_t cluster_size, uint8_t *out);

int vdisk_pread_full(int fd, uint8_t *buf, size_t len, uint64_t offset);

int vdisk_pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t offset);

int vdisk_pwrite_selected(int fd, const uint8_t *buf, size_t cluster_size, const uint8_t *select, size_t n,
                          uint64_t host_offset);

int vdisk_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len, uint8_t *bounce,
                     size_t bounce_len);

#endif /* VDISK_COPIER_H */
