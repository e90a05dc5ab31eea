/* statbench N PATH: N x (stat + open + close) of PATH = 3N path-walking system calls.
 * Built with gcc -static by bench_start.py at bench time (and dynamically for F1, whose
 * LD_PRELOAD cannot reach a static binary). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: statbench N PATH\n");
        return 2;
    }
    long n = atol(argv[1]);
    struct stat st;
    for (long i = 0; i < n; i++) {
        if (stat(argv[2], &st) != 0) {
            perror("stat");
            return 1;
        }
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) {
            perror("open");
            return 1;
        }
        close(fd);
    }
    return 0;
}
