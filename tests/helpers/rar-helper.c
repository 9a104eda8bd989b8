/* What busybox cannot do inside the guest, for the end-to-end tests:
 *
 *   rar-helper setxattr PATH NAME HEXVALUE   set an xattr (security.capability, user.*)
 *   rar-helper socket PATH                   bind a unix socket at PATH and exit (the
 *                                            socket file stays, as a daemon would leave it)
 *
 * Built static by the tests (gcc -static) and placed in a base layer, so it
 * runs in any base and is not part of the new layer.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int do_setxattr(const char *path, const char *name, const char *hex) {
    size_t n = strlen(hex);
    if (n % 2) {
        fprintf(stderr, "rar-helper: odd hex length\n");
        return 2;
    }
    unsigned char *buf = malloc(n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "rar-helper: bad hex\n");
            return 2;
        }
        buf[i] = (unsigned char)(hi * 16 + lo);
    }
    if (lsetxattr(path, name, buf, n / 2, 0) != 0) {
        fprintf(stderr, "rar-helper: setxattr %s %s: %s\n", path, name, strerror(errno));
        return 1;
    }
    return 0;
}

static int do_socket(const char *path) {
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "rar-helper: socket path too long\n");
        return 2;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        fprintf(stderr, "rar-helper: socket %s: %s\n", path, strerror(errno));
        return 1;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "setxattr") == 0) return do_setxattr(argv[2], argv[3], argv[4]);
    if (argc == 3 && strcmp(argv[1], "socket") == 0) return do_socket(argv[2]);
    fprintf(stderr, "usage: rar-helper setxattr PATH NAME HEXVALUE | rar-helper socket PATH\n");
    return 2;
}
