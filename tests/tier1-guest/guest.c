/*
 * The tier-1 test guest: a freestanding 64-bit program that the built-in
 * VMM loads as if it were a vmlinux (ELF, 64-bit boot protocol: long mode,
 * identity-mapped, %rsi = zero page) and that exercises the guest contract
 * the way Linux does, but in a few thousand instructions (on PVM, guest
 * kernel-mode code is emulated about 1000x slower than native):
 *
 *   1. prints through COM1, including the command line it finds through
 *      the zero page (cmd_line_ptr at offset 0x228);
 *   2. drives two virtio-mmio (version 2) block devices itself: the
 *      handshake, one queue each, GET_ID, reads and writes;
 *   3. copies sector 0 of the read-only disk (slot 0) to the writable one
 *      (slot 1), checks that the read-only disk refuses a write and that a
 *      read past the end fails;
 *   4. resets through the i8042 (0xfe to port 0x64).
 *
 * Build: see tests/tier1_vmm.rs (gcc -ffreestanding -nostdlib, link.ld).
 */
#include <stdint.h>

#define COM1 0x3f8
#define DISK0 0xd0000000UL /* layout::virtio_mmio_addr(0) */
#define DISK1 0xd0001000UL
#define QSZ 8

/* virtio-mmio registers (virtio 1.2, 4.2.2) */
#define MAGIC 0x000
#define VERSION 0x004
#define DEVICE_ID 0x008
#define DEVICE_FEATURES 0x010
#define DEVICE_FEATURES_SEL 0x014
#define DRIVER_FEATURES 0x020
#define DRIVER_FEATURES_SEL 0x024
#define QUEUE_SEL 0x030
#define QUEUE_NUM_MAX 0x034
#define QUEUE_NUM 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define INTERRUPT_STATUS 0x060
#define INTERRUPT_ACK 0x064
#define STATUS 0x070
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DESC_HIGH 0x084
#define QUEUE_AVAIL_LOW 0x090
#define QUEUE_AVAIL_HIGH 0x094
#define QUEUE_USED_LOW 0x0a0
#define QUEUE_USED_HIGH 0x0a4
#define CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

#define T_IN 0
#define T_OUT 1
#define T_GET_ID 8

__asm__(".section .text.start\n"
        ".global _start\n"
        "_start:\n"
        "  mov %rsi, %rdi\n" /* the zero page, as the first argument */
        "  call guest_main\n"
        "1: hlt\n"
        "  jmp 1b\n");

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

static void putc_(char c) { outb(COM1, (uint8_t)c); }

static void puts_(const char *s) {
    while (*s)
        putc_(*s++);
}

static void putdec(uint64_t v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(&buf[i]);
}

static volatile uint32_t *reg(uint64_t base, uint32_t off) { return (volatile uint32_t *)(base + off); }

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QSZ];
    uint16_t used_event;
};
struct used_elem {
    uint32_t id;
    uint32_t len;
};
struct used {
    uint16_t flags;
    uint16_t idx;
    struct used_elem ring[QSZ];
    uint16_t avail_event;
};
struct vq {
    struct desc desc[QSZ] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(2)));
    struct used used __attribute__((aligned(4)));
    uint16_t last_used;
};
struct req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* In .bss: the VMM's guest memory starts zeroed. */
static uint64_t mmio_pd[512] __attribute__((aligned(4096)));
static struct vq queues[2] __attribute__((aligned(4096)));
static struct req hdr;
static uint8_t sector[512] __attribute__((aligned(512)));
static volatile uint8_t status;
static char id[21];

static void stop(const char *why) {
    puts_("tier1 guest: FAILED: ");
    puts_(why);
    puts_("\n");
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("hlt");
}

static void set_addr(uint64_t base, uint32_t low, void *p) {
    uint64_t a = (uint64_t)p;
    *reg(base, low) = (uint32_t)a;
    *reg(base, low + 4) = (uint32_t)(a >> 32);
}

/* The driver side of 3.1.1 "Driver Requirements: Device Initialization". */
static void setup(uint64_t base, struct vq *q) {
    if (*reg(base, MAGIC) != 0x74726976 || *reg(base, VERSION) != 2 || *reg(base, DEVICE_ID) != 2)
        stop("not a virtio-mmio version 2 block device");
    *reg(base, STATUS) = 0;
    *reg(base, STATUS) = S_ACK;
    *reg(base, STATUS) = S_ACK | S_DRIVER;
    *reg(base, DEVICE_FEATURES_SEL) = 1;
    if (!(*reg(base, DEVICE_FEATURES) & 1))
        stop("VIRTIO_F_VERSION_1 not offered");
    *reg(base, DRIVER_FEATURES_SEL) = 1;
    *reg(base, DRIVER_FEATURES) = 1; /* VERSION_1 (bit 32) only */
    *reg(base, DRIVER_FEATURES_SEL) = 0;
    *reg(base, DRIVER_FEATURES) = 0;
    *reg(base, STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK;
    if (!(*reg(base, STATUS) & S_FEATURES_OK))
        stop("FEATURES_OK refused");
    *reg(base, QUEUE_SEL) = 0;
    if (*reg(base, QUEUE_NUM_MAX) < QSZ)
        stop("queue too small");
    *reg(base, QUEUE_NUM) = QSZ;
    set_addr(base, QUEUE_DESC_LOW, q->desc);
    set_addr(base, QUEUE_AVAIL_LOW, &q->avail);
    set_addr(base, QUEUE_USED_LOW, &q->used);
    *reg(base, QUEUE_READY) = 1;
    *reg(base, STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
}

/* One request: header, one data buffer, status byte. Returns the status. */
static uint8_t request(uint64_t base, struct vq *q, uint32_t type, uint64_t sec, void *buf, uint32_t len, int device_writes) {
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sec;
    status = 0xee;
    q->desc[0] = (struct desc){(uint64_t)&hdr, sizeof hdr, DESC_F_NEXT, 1};
    q->desc[1] = (struct desc){(uint64_t)buf, len, (uint16_t)(DESC_F_NEXT | (device_writes ? DESC_F_WRITE : 0)), 2};
    q->desc[2] = (struct desc){(uint64_t)&status, 1, DESC_F_WRITE, 0};
    q->avail.ring[q->avail.idx % QSZ] = 0;
    __sync_synchronize();
    q->avail.idx = (uint16_t)(q->avail.idx + 1);
    __sync_synchronize();
    *reg(base, QUEUE_NOTIFY) = 0;
    /* The VMM completes the request before the notify returns; bounded
     * wait all the same. */
    for (int spin = 0; *(volatile uint16_t *)&q->used.idx == q->last_used; spin++)
        if (spin > 1000)
            stop("request never completed");
    q->last_used++;
    if (*reg(base, INTERRUPT_STATUS) & 1)
        *reg(base, INTERRUPT_ACK) = 1;
    return status;
}

static void print_id(const char *name, uint64_t base, struct vq *q) {
    for (int i = 0; i < 21; i++)
        id[i] = 0;
    if (request(base, q, T_GET_ID, 0, id, 20, 1) != 0)
        stop("GET_ID failed");
    puts_(name);
    puts_(" id=");
    puts_(id);
    puts_(" sectors=");
    putdec(*(volatile uint64_t *)(base + CONFIG));
    puts_("\n");
}

/* The VMM's boot page tables map only the first GiB (enough for a
 * kernel, which builds its own at once); map the GiB holding the
 * virtio-mmio windows (3-4 GiB) with uncached 2 MiB pages, as a kernel
 * would. */
static void map_mmio(void) {
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    uint64_t *pml4 = (uint64_t *)(cr3 & ~0xfffUL);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & ~0xfffUL);
    for (uint64_t i = 0; i < 512; i++)
        mmio_pd[i] = (3UL << 30) + (i << 21) + 0x9b; /* 2M page, PCD, PWT, RW, P */
    pdpt[3] = (uint64_t)mmio_pd | 3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

void guest_main(uint8_t *zero_page) {
    puts_("tier1 guest: hello from COM1\n");
    map_mmio();
    const char *cmdline = (const char *)(uint64_t) * (uint32_t *)(zero_page + 0x228);
    puts_("tier1 guest: cmdline=");
    puts_(cmdline);
    puts_("\n");

    setup(DISK0, &queues[0]);
    setup(DISK1, &queues[1]);
    print_id("disk0", DISK0, &queues[0]);
    print_id("disk1", DISK1, &queues[1]);

    if (request(DISK0, &queues[0], T_IN, 0, sector, 512, 1) != 0)
        stop("reading sector 0 of disk0");
    if (request(DISK1, &queues[1], T_OUT, 0, sector, 512, 0) != 0)
        stop("writing sector 0 of disk1");
    puts_("tier1 guest: copied sector 0\n");

    puts_("tier1 guest: write to read-only disk0 status=");
    putdec(request(DISK0, &queues[0], T_OUT, 0, sector, 512, 0));
    puts_("\n");
    puts_("tier1 guest: read past the end of disk0 status=");
    putdec(request(DISK0, &queues[0], T_IN, *(volatile uint64_t *)(DISK0 + CONFIG), sector, 512, 1));
    puts_("\n");

    puts_("tier1 guest: resetting through the i8042\n");
    outb(0x64, 0xfe);
    stop("still running after the i8042 reset");
}
