//! "The guest is hostile": a tiny guest under capsid-vmm floods its
//! virtio-mmio devices (virtio-blk with a disk, virtio-vsock, virtio-rng)
//! with bad virtqueue contents in a loop, and the host must come out of it
//! alive, quiet and idle.
//!
//! Each round, on every device's request queue (blk 0, vsock tx, rng 0),
//! the guest posts and kicks, one by one: descriptors outside guest RAM,
//! crossing its end, at the top of the address space; lengths 0 and
//! 0xFFFFFFFF; chains that loop (two descriptors, one onto itself, and a
//! 192-descriptor loop: longer than the queue); next indices past the
//! queue; indirect descriptors (never negotiated) that loop, nest, have odd
//! or huge lengths, lie outside RAM or also carry NEXT; device-writable
//! buffers where readable ones are expected and the other way round; head
//! indices past the queue; the available index a whole ring (and one
//! entry) ahead; kicks with nothing new; notifications on queues that
//! do not exist or were never set up. Then, on the same queue and without
//! a reset, one valid request, whose completion the guest checks: the
//! hostile chains before it must not have stopped the device. Every 32nd
//! round it also programs each device badly before DRIVER_OK (queue sizes
//! of 0, 3, 255, 2048 and 0x10000; a ring outside RAM) and kicks it.
//!
//! The flood ends with every request queue left broken (its available
//! index far ahead) and the guest spinning in a `pause` loop: the host's
//! threads must then be idle. A key press (the control socket's shutdown,
//! Ctrl-Alt-Del) makes the guest read every device's status, reset and
//! re-initialise them as a driver recovering would, and make one valid
//! request of each (a random read, a read of a known disk sector, a vsock
//! connection request answered by a reset), print the results and reset
//! the VM.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use capsid_tests::asm::{self, LIB64};
use capsid_tests::vmm::Vmm;
use serde_json::json;

/// Kicks (queue notifications) the flood makes at least.
const KICKS: u64 = 100_000;
/// capsid-vmm's stderr must stay below this: the rate limiter
/// (capsid_devices::log_limit) lets 20 warnings per call site per minute
/// and 2000 in all through, a few hundred bytes each.
const MAX_STDERR: usize = 512 << 10;
/// The console cap (capsid_devices::capped_log::DEFAULT_MAX_BYTES).
const SERIAL_CAP: usize = 1 << 20;
/// Warnings let through per call site per minute (log_limit::PER_SITE).
const PER_SITE: usize = 20;
/// /proc reports CPU time in USER_HZ ticks, 100 a second on x86-64.
const TICKS_PER_SECOND: u64 = 100;
/// The idle window after the flood.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

const GUEST: &str = r#"
    .equ BLK, 0xd0000000
    .equ VSOCK, 0xd0001000
    .equ RNG, 0xd0002000
    .equ QSIZE, 256
    .equ VALID, 40
    # Descriptor flags.
    .equ N, 1
    .equ W, 2
    .equ I, 4
    # Beyond the guest's 64 MiB, and its last bytes.
    .equ OUTSIDE, 0xfff0000000
    .equ TOP, 0x3fff000
    # Buffers. BUFX, which hostile descriptors name, has nothing after it
    # (rng writes up to 64 KiB into it).
    .equ BLKHDR, 0x800000
    .equ BADHDR, 0x801000
    .equ BLKSTAT, 0x802000
    .equ BLKDATA, 0x803000
    .equ RNGBUF, 0x804000
    .equ VRST, 0x805000
    .equ VREQ, 0x806000
    .equ VHUGE, 0x807000
    .equ VREQF, 0x808000
    .equ IND, 0x809000
    .equ IND2, 0x80a000
    .equ RXBUF, 0x810000
    .equ BUFX, 0x1000000

    # Queue context, one per queue the guest drives (r15 points to it):
    # +0 MMIO base, +8 queue index, +12 size, +16 rings (descriptors at
    # +0, available ring at +0x2000, used ring at +0x3000), +24 the
    # driver's available index, +26 used entries seen, +32 the routine
    # writing the valid request at VALID, +40 its expected used length,
    # +44 failed valid requests, +48 the last bad used length.

.macro D idx, addr, len, flags, next=0
    mov edi, \idx
    mov rax, \addr
    mov ecx, \len
    mov edx, (\flags) | ((\next) << 16)
    call desc
.endm

.macro RD at, addr, len, flags, next=0
    mov rdi, \at
    mov rax, \addr
    mov ecx, \len
    mov edx, (\flags) | ((\next) << 16)
    call rawdesc
.endm

.macro NOTIFY base, queue
    mov rbx, \base
    mov dword ptr [rbx + 0x50], \queue
    inc qword ptr [rip + kicks]
.endm

.macro PRINT label
    lea rdi, [rip + \label]
    call puts
.endm

    .text
    .global _start
_start:
    mov rsp, 0x3f0000
    # No interrupt is wanted (IF stays clear); mask the PIC all the same.
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    call setup_buffers
    PRINT m_up
    call init_all

    xor r12d, r12d
round:
    test r12d, 31
    jnz 1f
    call config_hostile_all
1:  lea r15, [rip + q_blk]
    call ring_round
    lea r15, [rip + q_vtx]
    call ring_round
    lea r15, [rip + q_rng]
    call ring_round
    call notify_unset
    inc r12d
    # A valid request that failed ends the flood (each costs seconds).
    mov eax, [rip + q_blk + 44]
    or eax, [rip + q_vtx + 44]
    or eax, [rip + q_rng + 44]
    jnz 2f
    cmp qword ptr [rip + kicks], KICKS
    jb round
2:

    # Leave every request queue broken: its available index far ahead.
    lea r15, [rip + q_blk]
    call break_ring
    lea r15, [rip + q_vtx]
    call break_ring
    lea r15, [rip + q_rng]
    call break_ring
    call notify_unset

    PRINT m_flooded
    mov eax, r12d
    call puthex
    call putsp
    mov rax, [rip + kicks]
    call puthex
    call putnl
    PRINT m_fails
    mov eax, [rip + q_blk + 44]
    call puthex
    call putsp
    mov eax, [rip + q_vtx + 44]
    call puthex
    call putsp
    mov eax, [rip + q_rng + 44]
    call puthex
    call putsp
    mov eax, [rip + q_blk + 48]
    call puthex
    call putsp
    mov eax, [rip + q_vtx + 48]
    call puthex
    call putsp
    mov eax, [rip + q_rng + 48]
    call puthex
    call putnl
    PRINT m_config
    mov eax, [rip + cfg_tries]
    call puthex
    call putsp
    mov eax, [rip + cfg_needs_reset]
    call puthex
    call putsp
    mov eax, [rip + st_outside]
    call puthex
    call putsp
    mov eax, [rip + st_badsize]
    call puthex
    call putnl
    PRINT m_idle

    # Idle until a key arrives (the host's shutdown request): pause, and
    # only now and then an exit to look at the keyboard.
5:  mov ecx, 200000
6:  pause
    dec ecx
    jnz 6b
    in al, 0x64
    test al, 1
    jz 5b
    in al, 0x60

    # What the devices say after the flood, then a driver's recovery.
    PRINT m_status
    mov rbx, BLK
    mov eax, [rbx + 0x70]
    call puthex
    call putsp
    mov rbx, VSOCK
    mov eax, [rbx + 0x70]
    call puthex
    call putsp
    mov rbx, RNG
    mov eax, [rbx + 0x70]
    call puthex
    call putnl
    call init_all

    # rng: 16 random bytes.
    lea r15, [rip + q_rng]
    mov qword ptr [RNGBUF], 0
    mov qword ptr [RNGBUF + 8], 0
    D 0, RNGBUF, 16, W
    xor edi, edi
    call post
    call kick
    xor edi, edi
    call wait_head
    push rax
    PRINT m_rng
    pop rax
    call puthex
    call putsp
    mov rax, [RNGBUF]
    call puthex
    call putsp
    mov rax, [RNGBUF + 8]
    call puthex
    call putnl

    # blk: sector 0.
    lea r15, [rip + q_blk]
    mov qword ptr [BLKDATA], 0
    call valid_blk
    mov edi, VALID
    call post
    call kick
    mov edi, VALID
    call wait_head
    push rax
    PRINT m_blk
    pop rax
    call puthex
    call putsp
    movzx eax, byte ptr [BLKSTAT]
    call puthex
    call putsp
    mov rax, [BLKDATA]
    call puthex
    call putnl

    # vsock: an rx buffer, then a connection request to a host port no
    # one listens on; the device answers with a reset.
    lea r15, [rip + q_vrx]
    D 0, RXBUF, 4096, W
    xor edi, edi
    call post
    call kick
    lea r15, [rip + q_vtx]
    D 0, VREQF, 44, 0
    xor edi, edi
    call post
    call kick
    xor edi, edi
    call wait_head
    lea r15, [rip + q_vrx]
    xor edi, edi
    call wait_head
    push rax
    PRINT m_vsock
    pop rax
    call puthex
    call putsp
    movzx eax, word ptr [RXBUF + 30]
    call puthex
    call putsp
    mov eax, [RXBUF + 16]
    call puthex
    call putsp
    mov eax, [RXBUF + 20]
    call puthex
    call putnl
    PRINT m_done
    call reset

# Every device reset, negotiated (VERSION_1 only: no indirect
# descriptors, no event index) and running; vsock's event queue is never
# set up.
init_all:
    lea r15, [rip + q_blk]
    mov rbx, [r15]
    call dev_begin
    call q_setup
    call drv_ok
    cmp eax, 0xf
    jne init_failed
    lea r15, [rip + q_vrx]
    mov rbx, [r15]
    call dev_begin
    call q_setup
    lea r15, [rip + q_vtx]
    call q_setup
    call drv_ok
    cmp eax, 0xf
    jne init_failed
    lea r15, [rip + q_rng]
    mov rbx, [r15]
    call dev_begin
    call q_setup
    call drv_ok
    cmp eax, 0xf
    jne init_failed
    ret
init_failed:
    push rax
    PRINT m_init_failed
    mov rax, [r15]
    call puthex
    call putsp
    pop rax
    call puthex
    call putnl
    call reset

# rbx: MMIO base. Reset, then ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK.
dev_begin:
    mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x70], 0xb
    ret

# Zeroes the queue's rings and programs it, ready (a driver's set-up).
q_setup:
    mov rbx, [r15]
    mov rdi, [r15 + 16]
    xor eax, eax
    mov ecx, 0x4000
    rep stosb
    mov dword ptr [r15 + 24], 0
    mov eax, [r15 + 8]
    mov [rbx + 0x30], eax
    mov eax, [r15 + 12]
    mov [rbx + 0x38], eax
    mov rax, [r15 + 16]
    mov [rbx + 0x80], eax
    mov dword ptr [rbx + 0x84], 0
    add eax, 0x2000
    mov [rbx + 0x90], eax
    mov dword ptr [rbx + 0x94], 0
    add eax, 0x1000
    mov [rbx + 0xa0], eax
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1
    ret

# DRIVER_OK; returns the status read back.
drv_ok:
    mov rbx, [r15]
    mov dword ptr [rbx + 0x70], 0xf
    mov eax, [rbx + 0x70]
    ret

# Descriptor EDI of the queue: RAX address, ECX length, EDX flags and
# next << 16.
desc:
    push rdi
    shl rdi, 4
    add rdi, [r15 + 16]
    call rawdesc
    pop rdi
    ret
rawdesc:
    mov [rdi], rax
    mov [rdi + 8], ecx
    mov [rdi + 12], edx
    ret

# Puts head DI on the available ring and publishes it.
post:
    mov r8, [r15 + 16]
    movzx eax, word ptr [r15 + 24]
    mov ecx, [r15 + 12]
    dec ecx
    and ecx, eax
    mov [r8 + 0x2004 + rcx * 2], di
    inc eax
    mov [r15 + 24], ax
    mov [r8 + 0x2002], ax
    ret

kick:
    mov rbx, [r15]
    mov eax, [r15 + 8]
    mov [rbx + 0x50], eax
    inc qword ptr [rip + kicks]
    ret

# Waits for head EDI on the used ring; returns its length in EAX, or
# 0xffffffff when it did not come back within a few seconds.
wait_head:
    mov r8, [r15 + 16]
    add r8, 0x3000
    mov r9d, SPIN
    mov r11d, [r15 + 12]
    dec r11d
1:  movzx r10d, word ptr [r8 + 2]
    movzx ecx, word ptr [r15 + 26]
2:  cmp cx, r10w
    je 3f
    mov eax, ecx
    and eax, r11d
    cmp [r8 + 4 + rax * 8], edi
    je 4f
    inc ecx
    jmp 2b
3:  mov [r15 + 26], cx
    pause
    dec r9d
    jnz 1b
    mov eax, 0xffffffff
    ret
4:  mov eax, [r8 + 8 + rax * 8]
    inc ecx
    mov [r15 + 26], cx
    ret

# The hostile descriptor table (device-neutral: both directions of each
# abuse), then the queue's valid request at VALID.
write_table:
    D 0, OUTSIDE, 4096, W
    D 1, OUTSIDE, 4096, 0
    D 2, BUFX, 0, W
    D 3, BUFX, 0, 0
    D 4, BUFX, 0xffffffff, W
    D 5, BUFX, 0xffffffff, 0
    D 6, 0xfffffffffffff000, 0xffffffff, W
    D 7, BUFX, 16, N, 8
    D 8, BUFX, 16, N|W, 7
    D 9, BUFX, 16, N|W, 9
    D 10, BUFX, 16, N, 300
    D 11, BUFX, 16, N, 0xffff
    D 12, IND, 64, I
    D 13, IND, 0xffffffff, I
    D 14, OUTSIDE, 64, I
    D 15, IND, 16, I|N, 16
    D 16, BUFX, 16, W
    D 17, IND, 17, I
    D 18, IND2, 16, I
    D 19, BUFX, 16, N|W, 20
    D 20, BUFX, 16, 0
    D 21, BUFX, 16, W
    D 22, BUFX, 16, 0
    D 23, BUFX, 8, N, 24
    D 24, BUFX+0x1000, 1, W
    D 25, BADHDR, 16, N, 26
    D 26, BUFX, 512, N|W, 27
    D 27, BUFX+0x1000, 1, W
    D 28, VREQ, 44, 0
    D 29, VHUGE, 44, N, 30
    D 30, BUFX, 16, 0
    D 31, IND, 0, I
    D 32, TOP, 0x2000, W
    D 33, TOP+0xff0, 0x20, 0
    D 34, BUFX, 16, N|W, 35
    D 35, OUTSIDE, 1, W
    # 64..255: one chain, looping back onto itself: longer than the queue.
    mov r9d, 64
1:  mov edi, r9d
    mov rax, BUFX
    mov ecx, 16
    lea edx, [r9 + 1]
    shl edx, 16
    or edx, N
    call desc
    inc r9d
    cmp r9d, 255
    jb 1b
    D 255, BUFX, 16, N|W, 64
    jmp qword ptr [r15 + 32]

valid_blk:
    mov byte ptr [BLKSTAT], 0xff
    D VALID, BLKHDR, 16, N, VALID+1
    D VALID+1, BLKDATA, 512, N|W, VALID+2
    D VALID+2, BLKSTAT, 1, W
    ret
valid_rng:
    D VALID, RNGBUF, 16, W
    ret
valid_vsock:
    # A reset for a connection that does not exist: taken, answered with
    # nothing.
    D VALID, VRST, 44, 0
    ret

# One round of abuse on the request queue at r15, then its valid request.
ring_round:
    call write_table
    lea rsi, [rip + heads]
1:  movzx edi, word ptr [rsi]
    cmp edi, 0xfffe
    je 2f
    push rsi
    call post
    call kick
    pop rsi
    add rsi, 2
    jmp 1b
    # Heads past the queue, then several bad chains in one kick.
2:  mov edi, 300
    call post
    mov edi, 0xffff
    call post
    call kick
    mov edi, 7
    call post
    mov edi, 13
    call post
    mov edi, 64
    call post
    mov edi, 23
    call post
    call kick
    # The available index a whole ring ahead, then one entry too many.
    mov r8, [r15 + 16]
    movzx eax, word ptr [r15 + 24]
    add eax, 0x8000
    mov [r8 + 0x2002], ax
    call kick
    mov r8, [r15 + 16]
    movzx eax, word ptr [r15 + 24]
    add eax, QSIZE + 1
    mov [r8 + 0x2002], ax
    call kick
    mov r8, [r15 + 16]
    movzx eax, word ptr [r15 + 24]
    mov [r8 + 0x2002], ax
    # Kicks with nothing new.
    mov esi, 8
3:  call kick
    dec esi
    jnz 3b
    # The valid request, on the same queue, no reset.
    mov edi, VALID
    call post
    call kick
    mov edi, VALID
    call wait_head
    cmp eax, [r15 + 40]
    je 4f
    inc dword ptr [r15 + 44]
    mov [r15 + 48], eax
4:  ret

# Leaves the queue at r15 with its available index far ahead, kicked.
break_ring:
    mov r8, [r15 + 16]
    movzx eax, word ptr [r15 + 24]
    add eax, 0x8000
    mov [r8 + 0x2002], ax
    jmp kick

# Notifications of queues the devices do not have or that are not set up.
notify_unset:
    NOTIFY BLK, 1
    NOTIFY BLK, 0xffff
    NOTIFY BLK, 0x10000
    NOTIFY VSOCK, 0
    NOTIFY VSOCK, 2
    NOTIFY VSOCK, 3
    NOTIFY VSOCK, 0xffff
    NOTIFY RNG, 1
    NOTIFY RNG, 0x7fffffff
    ret

# Bad set-ups before DRIVER_OK on each device, then every device
# re-initialised.
config_hostile_all:
    lea r15, [rip + q_blk]
    call config_hostile
    lea r15, [rip + q_vrx]
    call config_hostile
    lea r15, [rip + q_rng]
    call config_hostile
    jmp init_all

config_hostile:
    # A queue size that is 0, not a power of two, past the maximum or
    # past 16 bits, cycling with the round.
    mov rbx, [r15]
    call dev_begin
    call q_setup
    mov dword ptr [rbx + 0x44], 0
    mov eax, r12d
    shr eax, 5
    xor edx, edx
    mov ecx, 5
    div ecx
    lea rax, [rip + bad_sizes]
    mov eax, [rax + rdx * 4]
    mov [rbx + 0x38], eax
    mov dword ptr [rbx + 0x44], 1
    call drv_ok
    mov [rip + st_badsize], eax
    call kick
    # The descriptor table outside guest RAM.
    mov rbx, [r15]
    call dev_begin
    call q_setup
    mov dword ptr [rbx + 0x84], 0x10
    call drv_ok
    mov [rip + st_outside], eax
    inc dword ptr [rip + cfg_tries]
    test eax, 0x40
    jz 1f
    inc dword ptr [rip + cfg_needs_reset]
1:  call kick
    # Kicks before DRIVER_OK.
    mov rbx, [r15]
    call dev_begin
    call q_setup
    jmp kick

# vsock headers: RDI at, ESI source port, EDX destination port, ECX op,
# R8D length; guest CID 3 to the host (2), stream.
vhdr:
    mov qword ptr [rdi], 3
    mov qword ptr [rdi + 8], 2
    mov [rdi + 16], esi
    mov [rdi + 20], edx
    mov [rdi + 24], r8d
    mov word ptr [rdi + 28], 1
    mov [rdi + 30], cx
    mov dword ptr [rdi + 32], 0
    mov dword ptr [rdi + 36], 0x10000
    mov dword ptr [rdi + 40], 0
    ret

setup_buffers:
    # blk: a read of sector 0, and one of sector 2^63.
    mov qword ptr [BLKHDR], 0
    mov qword ptr [BLKHDR + 8], 0
    mov qword ptr [BADHDR], 0
    mov rax, 0x8000000000000000
    mov [BADHDR + 8], rax
    # vsock: a reset (op 3) for no connection, a connection request
    # (op 1) in the flood and the final one, data (op 5) of 4 GiB.
    mov rdi, VRST
    mov esi, 1
    mov edx, 2
    mov ecx, 3
    xor r8d, r8d
    call vhdr
    mov rdi, VREQ
    mov esi, 1000
    mov edx, 5556
    mov ecx, 1
    xor r8d, r8d
    call vhdr
    mov rdi, VHUGE
    mov esi, 1001
    mov edx, 5557
    mov ecx, 5
    mov r8d, 0xffffffff
    call vhdr
    mov rdi, VREQF
    mov esi, 8888
    mov edx, 5555
    mov ecx, 1
    xor r8d, r8d
    call vhdr
    # Indirect tables: a looping one with a huge entry, and one naming it.
    RD IND, BUFX, 16, N, 1
    RD IND+16, BUFX, 16, N|W, 2
    RD IND+32, BUFX, 16, N|W, 0
    RD IND+48, OUTSIDE, 0xffffffff, W
    RD IND2, IND, 64, I
    ret

m_up:          .asciz "UP\n"
m_flooded:     .asciz "FLOODED "
m_fails:       .asciz "FAILS "
m_config:      .asciz "CONFIG "
m_idle:        .asciz "IDLE\n"
m_status:      .asciz "STATUS "
m_rng:         .asciz "RNG "
m_blk:         .asciz "BLK "
m_vsock:       .asciz "VSOCK "
m_done:        .asciz "DONE\n"
m_init_failed: .asciz "INIT FAILED "

    .data
    .align 8
heads:
    .word 0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19
    .word 21, 22, 23, 25, 28, 29, 31, 32, 33, 34, 64, 0xfffe
bad_sizes:
    .long 0, 3, 255, 2048, 0x10000
    .align 8
q_blk:
    .quad BLK
    .long 0, QSIZE
    .quad 0x400000
    .long 0, 0
    .quad valid_blk
    .long 513, 0, 0, 0
q_vtx:
    .quad VSOCK
    .long 1, QSIZE
    .quad 0x410000
    .long 0, 0
    .quad valid_vsock
    .long 0, 0, 0, 0
q_vrx:
    .quad VSOCK
    .long 0, QSIZE
    .quad 0x420000
    .long 0, 0
    .quad 0
    .long 0, 0, 0, 0
q_rng:
    .quad RNG
    .long 0, QSIZE
    .quad 0x430000
    .long 0, 0
    .quad valid_rng
    .long 16, 0, 0, 0
kicks:           .quad 0
cfg_tries:       .long 0
cfg_needs_reset: .long 0
st_outside:      .long 0
st_badsize:      .long 0
"#;

/// CPU time (user + system, in ticks) of each thread of `pid`, by name.
fn thread_cpu(pid: u32) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state is
        // the first, utime the 12th, stime the 13th.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        *out.entry(comm.trim().to_string()).or_default() += ticks;
    }
    out
}

/// `line` without its terminal colour sequences (ESC '[' ... 'm').
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The process is there and not a zombie.
fn alive(vm: &mut Vmm) -> bool {
    let pid = vm.child.id();
    if vm.child.try_wait().unwrap().is_some() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// The hex numbers after `label` on its line of the console.
fn numbers(serial: &str, label: &str) -> Vec<u64> {
    let line = serial
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line on the console:\n{serial}"));
    line.split_whitespace()
        .map(|h| u64::from_str_radix(h, 16).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

#[test]
fn a_hostile_guest_leaves_the_vmm_alive_quiet_and_idle() {
    let dir = tempfile::tempdir().unwrap();
    // wait_head's budget of `pause`s: seconds, not forever.
    let source = format!(".equ KICKS, {KICKS}\n.equ SPIN, 0x4000000\n{GUEST}{LIB64}");
    let kernel = asm::elf(&source, dir.path(), "hostile");
    // A read-only disk whose sector 0 the guest reads at the end.
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..8].copy_from_slice(b"HOSTILE!");
    std::fs::write(&disk, &image).unwrap();
    let uds = dir.path().join("vsock.sock");
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 64,
        "boot": {"linux": {"kernel": kernel}},
        "drives": [{"path": disk, "read_only": true}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "rng": true,
    }));
    let pid = vm.child.id();
    vm.wait_serial("UP\n", Duration::from_secs(30));

    // The flood: the VMM must stay alive throughout.
    let started = Instant::now();
    let mut polls = 0u64;
    loop {
        assert!(
            alive(&mut vm),
            "capsid-vmm died during the flood after {polls} polls\nserial:\n{}\nstderr:\n{}",
            vm.serial(),
            vm.stderr()
        );
        polls += 1;
        if vm.serial().contains("IDLE\n") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the flood did not end within 10 minutes\nserial:\n{}\nstderr:\n{}",
            vm.serial(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let flood_time = started.elapsed();
    // The console never rotated (its generations are gone with the
    // directory once the VMM ends).
    assert!(!vm.dir.path().join("serial.log.1").exists());

    // The guest only spins now: the host's threads other than the vCPU
    // must be idle, the device thread first of all.
    let before = thread_cpu(pid);
    std::thread::sleep(IDLE_WINDOW);
    let after = thread_cpu(pid);
    assert!(alive(&mut vm), "capsid-vmm died while the guest idled");
    let window = IDLE_WINDOW.as_secs() * TICKS_PER_SECOND;
    let grew = |name: &str| {
        let was = before.get(name).copied().unwrap_or(0);
        after.get(name).copied().unwrap_or(0).saturating_sub(was)
    };
    assert!(
        after.contains_key("devices"),
        "no devices thread in {after:?}"
    );
    let devices_idle = grew("devices");
    let host_idle: u64 = after
        .keys()
        .filter(|name| !name.starts_with("vcpu"))
        .map(|name| grew(name))
        .sum();
    eprintln!(
        "flood: {flood_time:?}, {polls} liveness polls; devices thread CPU {} ticks in all, \
         {devices_idle} ticks over the {IDLE_WINDOW:?} idle window, host threads {host_idle}",
        before.get("devices").copied().unwrap_or(0)
    );
    assert!(
        devices_idle * 10 < window,
        "the devices thread used {devices_idle} of {window} ticks while the guest idled: {before:?} -> {after:?}"
    );
    assert!(
        host_idle * 10 < window,
        "capsid-vmm's host threads used {host_idle} of {window} ticks while the guest idled: {before:?} -> {after:?}"
    );

    // The key press: the guest recovers its devices and uses them.
    let r = vm.control(json!({"op": "shutdown", "timeout_ms": 60_000}));
    assert_eq!(r["ok"], true, "{r}");
    let end = vm.wait(Duration::from_secs(90));
    let report = format!("serial:\n{}\nstderr:\n{}", end.serial, end.stderr);
    assert_eq!(end.code, 0, "{report}");
    let s = &end.serial;
    assert!(s.ends_with("DONE\n"), "{report}");

    let flooded = numbers(s, "FLOODED ");
    assert!(flooded[1] >= KICKS, "{report}");
    // Every valid request made after hostile ones on the same queue, with
    // no reset in between, came back complete.
    assert_eq!(numbers(s, "FAILS ")[..3], [0, 0, 0], "{report}");
    // A ring outside guest memory at DRIVER_OK always puts the device in
    // NEEDS_RESET instead of activating it (ACK|DRIVER|FEATURES_OK|
    // NEEDS_RESET). A bad queue size is ignored by virtio-queue (the
    // queue keeps its maximum size) so the device may activate or need a
    // reset; it must do one of the two.
    let config = numbers(s, "CONFIG ");
    assert!(config[0] >= 3, "{report}");
    assert_eq!(config[1], config[0], "{report}");
    assert_eq!(config[2], 0x4b, "{report}");
    assert!(matches!(config[3], 0x4b | 0xf), "{report}");
    // Left with broken rings, no device marked itself NEEDS_RESET: they
    // ignore what they cannot use and stay DRIVER_OK.
    assert_eq!(numbers(s, "STATUS "), [0xf, 0xf, 0xf], "{report}");
    // After the driver's recovery: 16 random bytes...
    let rng = numbers(s, "RNG ");
    assert_eq!(rng[0], 16, "{report}");
    assert!(rng[1] | rng[2] != 0, "{report}");
    // ... sector 0 of the disk (512 bytes and the status byte, OK)...
    let magic = u64::from_le_bytes(*b"HOSTILE!");
    assert_eq!(numbers(s, "BLK "), [513, 0, magic], "{report}");
    // ... and a vsock reset (op 3), 44 bytes, from host port 5555 to the
    // guest's 8888: the host tried the connection and refused it.
    assert_eq!(numbers(s, "VSOCK "), [44, 3, 5555, 8888], "{report}");

    // The logs stayed bounded.
    assert!(
        end.stderr.len() < MAX_STDERR,
        "stderr is {} bytes\n{report}",
        end.stderr.len()
    );
    let serial_len = end.serial.len();
    assert!(serial_len <= SERIAL_CAP, "{serial_len}");
    assert!(s.starts_with("UP\n"), "{report}");
    // Warnings: each call site let through at most 20 a minute; a flood
    // this size hits at least one site far more often than that, so if
    // the device warned at all, the limiter must show.
    let minutes = usize::try_from(flood_time.as_secs() / 60).unwrap() + 2;
    let mut per_message: HashMap<String, usize> = HashMap::new();
    for line in end.stderr.lines() {
        let line = strip_ansi(line);
        let mut words = line.split_whitespace().skip(1).peekable();
        if !matches!(words.peek(), Some(&("WARN" | "ERROR"))) {
            continue;
        }
        // Level, target and message, without the timestamp and fields:
        // one key per call site (or finer, where values are in the text).
        let key: Vec<&str> = words.take_while(|w| !w.contains('=')).collect();
        *per_message.entry(key.join(" ")).or_default() += 1;
    }
    for (message, count) in &per_message {
        assert!(
            *count <= PER_SITE * minutes,
            "{count} lines of {message:?}\n{report}"
        );
    }
    if !per_message.is_empty() {
        let limited = per_message.values().any(|&c| c >= PER_SITE)
            || end.stderr.contains("warnings were dropped")
            || end.stderr.contains("further warnings are dropped");
        assert!(
            limited,
            "warnings but no sign of the limiter: {per_message:?}\n{report}"
        );
    }
    eprintln!(
        "rounds {}, kicks {}, config rounds {}; stderr {} bytes, {} warning sites {per_message:?}; \
         serial {serial_len} bytes",
        flooded[0],
        flooded[1],
        config[0],
        end.stderr.len(),
        per_message.len()
    );
}
