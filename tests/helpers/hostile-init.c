/* A hostile guest for tests/e2e_hostile.rs: PID 1 of an initramfs given
 * with --initramfs, standing for a guest whose kernel a root script took
 * over. It does what such a guest can do to the host: write anything on
 * the output disk.
 *
 * It finds the output disk by its virtio-blk serial ("rar-output", read
 * from /sys/block/vdX/serial, as guest-init/src/disks.rs does), copies
 * /result (put in the initramfs by the test: a result header area of
 * RESULT_AREA bytes, then a crafted payload; guest-init/src/contract.rs)
 * to the disk's first byte, syncs and reboots. The host must refuse it.
 *
 * Built static by the tests (gcc -static), like rar-helper.c.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#define SERIAL "rar-output"

static void say(const char *what) {
    /* fd 1 is /dev/console when the initramfs has the node. */
    dprintf(1, "hostile-init: %s (%s)\n", what, strerror(errno));
}

static void end(void) {
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

/* Writes /dev/NAME of the disk whose serial is SERIAL into out. */
static int find_output(char *out, size_t len) {
    DIR *d = opendir("/sys/block");
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "vd", 2) != 0) continue;
        char path[300], serial[64] = {0};
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, serial, sizeof serial - 1);
        close(fd);
        while (n > 0 && (serial[n - 1] == '\n' || serial[n - 1] == ' ' || serial[n - 1] == '\0')) serial[--n] = '\0';
        if (strcmp(serial, SERIAL) == 0) {
            snprintf(out, len, "/dev/%s", e->d_name);
            closedir(d);
            return 0;
        }
    }
    closedir(d);
    return -1;
}

int main(void) {
    mkdir("/sys", 0755);
    mkdir("/dev", 0755);
    if (mount("sysfs", "/sys", "sysfs", 0, NULL) != 0) say("mounting /sys");
    if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0 && errno != EBUSY) say("mounting /dev");
    char dev[300];
    if (find_output(dev, sizeof dev) != 0) {
        say("no disk with serial " SERIAL);
        end();
    }
    int in = open("/result", O_RDONLY);
    int out = open(dev, O_WRONLY);
    if (in < 0 || out < 0) {
        say("opening /result or the output disk");
        end();
    }
    static char buf[1 << 16];
    ssize_t n;
    long long total = 0;
    while ((n = read(in, buf, sizeof buf)) > 0) {
        if (write(out, buf, n) != n) {
            say("writing the output disk");
            end();
        }
        total += n;
    }
    fsync(out);
    dprintf(1, "hostile-init: wrote %lld bytes to %s\n", total, dev);
    end();
    return 0;
}
