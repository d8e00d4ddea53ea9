/* The load generator of bench/turn_core.py: UDP as fast as one core sends it.
 *
 *   udpblast SECONDS MAX_PACKETS SEND_FDS RECV_FDS MESSAGE_FILE
 *
 * SEND_FDS and RECV_FDS are comma-separated descriptors the parent passed on (connected UDP
 * sockets it set up: allocations, channels, permissions); MESSAGE_FILE holds the datagram to
 * send (ChannelData, or a Binding request). It sends that datagram round-robin on SEND_FDS in
 * batches (sendmmsg) and counts what arrives on RECV_FDS (recvmmsg), never blocking, for at most
 * SECONDS and MAX_PACKETS sent, and prints
 *   sent=N received=M seconds=S cpu=C
 * (C: its own CPU seconds). Only what arrives within the window counts: in a steady state the
 * rate received/S is the throughput of what is under test. Python could not outrun the servers under test; this can.
 * Loopback only: it sends nowhere but where the parent's sockets are connected.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define MAX_FDS 256

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int parse_fds(const char *list, int *fds) {
    int n = 0;
    char *copy = strdup(list), *save = NULL;
    for (char *p = strtok_r(copy, ",", &save); p && n < MAX_FDS; p = strtok_r(NULL, ",", &save))
        fds[n++] = atoi(p);
    free(copy);
    return n;
}

static long drain(const int *fds, int n, struct mmsghdr *in) {
    long got = 0;
    for (int i = 0; i < n; i++) {
        for (;;) {
            int r = recvmmsg(fds[i], in, BATCH, MSG_DONTWAIT, NULL);
            if (r <= 0)
                break;
            got += r;
            if (r < BATCH)
                break;
        }
    }
    return got;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: udpblast SECONDS MAX_PACKETS SEND_FDS RECV_FDS MESSAGE_FILE\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    long max_packets = atol(argv[2]);
    if (seconds <= 0 || seconds > 60 || max_packets <= 0) {
        fprintf(stderr, "udpblast: SECONDS must be in (0, 60], MAX_PACKETS positive\n");
        return 2;
    }
    int send_fds[MAX_FDS], recv_fds[MAX_FDS];
    int ns = parse_fds(argv[3], send_fds), nr = parse_fds(argv[4], recv_fds);
    static char message[65536];
    FILE *f = fopen(argv[5], "rb");
    if (!f) {
        perror("udpblast: message file");
        return 2;
    }
    size_t size = fread(message, 1, sizeof message, f);
    fclose(f);

    static char inbuf[BATCH][2048];
    struct iovec out_iov = {message, size}, in_iov[BATCH];
    struct mmsghdr out[BATCH], in[BATCH];
    memset(out, 0, sizeof out);
    memset(in, 0, sizeof in);
    for (int i = 0; i < BATCH; i++) {
        out[i].msg_hdr.msg_iov = &out_iov;
        out[i].msg_hdr.msg_iovlen = 1;
        in_iov[i].iov_base = inbuf[i];
        in_iov[i].iov_len = sizeof inbuf[i];
        in[i].msg_hdr.msg_iov = &in_iov[i];
        in[i].msg_hdr.msg_iovlen = 1;
    }

    long sent = 0, received = 0;
    double start = now(), stop = start + seconds, end;
    int turn = 0;
    while ((end = now()) < stop && sent < max_packets) {
        for (int k = 0; k < ns; k++) {
            int r = sendmmsg(send_fds[turn], out, BATCH, MSG_DONTWAIT);
            turn = (turn + 1) % ns;
            if (r > 0)
                sent += r;
        }
        received += drain(recv_fds, nr, in);
    }
    double elapsed = end - start;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
                 usage.ru_stime.tv_usec / 1e6;
    printf("sent=%ld received=%ld seconds=%.4f cpu=%.4f\n", sent, received, elapsed, cpu);
    return 0;
}
