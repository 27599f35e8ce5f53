/* The floor under any stub in GDB's path, native: `stub_floor.py`'s loop in C (see there for what it does
 * and does not do). A measuring instrument for bench/gdb_proxy.py --floors, built there with `cc -O2` into
 * a temporary directory; never part of probed.
 *
 * Started by stub_floor.py with fd 3 = QEMU's gdbstub, fd 4 = the listening socket, and
 * argv: OWED REGISTERS FRAME THREADS
 *   OWED       1 when QEMU's last packet is not acked yet (QEMU 7.2 keeps acks on)
 *   REGISTERS  "regnum:offset:size,..." for every register in `g`
 *   FRAME      the same for sp, fp and pc (what a step's stop carries)
 *   THREADS    QEMU's thread ids, "1,2"
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct { int fd; char buf[1 << 17]; int len, pos; } peer;
static peer Q, G;
static int owed, ack = 1;
static int nregs, regs[128][3], nthree, three[8][3];
static char threads[256];
static unsigned long wanted[64][2], installed[64][2];
static int nwanted, ninstalled;
static char gcache[8192]; static int gvalid;
static unsigned long reads[8][2], pref[8][2]; static int nreads, npref;
static char snap[8][8192]; static unsigned long snapk[8][2]; static int nsnap;

static void die(const char *m) { perror(m); exit(1); }
static void wall(int fd, const char *p, int n) { while (n > 0) { int k = write(fd, p, n); if (k <= 0) die("write"); p += k; n -= k; } }
static int fill(peer *p) {
    if (p->pos > 0 && p->pos == p->len) p->pos = p->len = 0;
    int k = read(p->fd, p->buf + p->len, sizeof p->buf - p->len);
    if (k <= 0) exit(0);
    p->len += k; return k;
}
/* Next event: returns 1 and payload (unescaped, NUL-terminated) for a packet, 3 for ^C. */
static int next(peer *p, char *out, int *outlen) {
    for (;;) {
        while (p->pos < p->len) {
            char c = p->buf[p->pos];
            if (c == 3) { p->pos++; return 3; }
            if (c != '$') { p->pos++; continue; }
            char *h = memchr(p->buf + p->pos, '#', p->len - p->pos);
            if (!h || h + 2 >= p->buf + p->len) break;
            int n = 0;
            for (char *s = p->buf + p->pos + 1; s < h; s++) {
                if (*s == '}') { s++; out[n++] = *s ^ 0x20; }
                else out[n++] = *s;
            }
            out[n] = 0; *outlen = n;
            p->pos = h + 3 - p->buf;
            return 1;
        }
        if (p->pos > 0) { memmove(p->buf, p->buf + p->pos, p->len - p->pos); p->len -= p->pos; p->pos = 0; }
        fill(p);
    }
}
static int frame(char *dst, const char *payload, int n) {
    int k = 0; unsigned sum = 0; dst[k++] = '$';
    for (int i = 0; i < n; i++) {
        char c = payload[i];
        if (c == '#' || c == '$' || c == '}' || c == '*') { dst[k++] = '}'; sum += '}'; c ^= 0x20; }
        dst[k++] = c; sum += (unsigned char)c;
    }
    return k + sprintf(dst + k, "#%02x", sum & 0xff);
}
static char wbuf[1 << 17];
static void qsend_frames(char (*pl)[128], int *lens, int n) {
    int k = 0; if (owed) { wbuf[k++] = '+'; owed = 0; }
    for (int i = 0; i < n; i++) k += frame(wbuf + k, pl[i], lens[i]);
    wall(Q.fd, wbuf, k);
}
static int qpacket(char *out) { int n; while (next(&Q, out, &n) != 1) ; owed = 1; return n; }
static void greply(const char *p, int n) {
    int k = 0; if (ack) wbuf[k++] = '+';
    k += frame(wbuf + k, p, n); wall(G.fd, wbuf, k);
}
static char pkt[1 << 17], rep[1 << 17], tmp[1 << 17];
static char pl[80][128]; static int pls[80];

static int has(unsigned long (*set)[2], int n, unsigned long a, unsigned long k) {
    for (int i = 0; i < n; i++)
        if (set[i][0] == a && set[i][1] == k) return 1;
    return 0;
}
static int expedite(char *dst, int (*r)[3], int n) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        k += sprintf(dst + k, "%02x:", r[i][0]);
        memcpy(dst + k, gcache + 2 * r[i][1], 2 * r[i][2]); k += 2 * r[i][2]; dst[k++] = ';';
    }
    return k;
}
static void resume(const char *p, int n, int step) {
    int np = 0;
    if (!step) {
        for (int i = 0; i < nwanted; i++) if (!has(installed, ninstalled, wanted[i][0], wanted[i][1]))
            pls[np] = sprintf(pl[np], "Z0,%lx,%lx", wanted[i][0], wanted[i][1]), np++;
        for (int i = 0; i < ninstalled; i++) if (!has(wanted, nwanted, installed[i][0], installed[i][1]))
            pls[np] = sprintf(pl[np], "z0,%lx,%lx", installed[i][0], installed[i][1]), np++;
        memcpy(installed, wanted, sizeof wanted); ninstalled = nwanted;
    }
    memcpy(pref, reads, sizeof reads); npref = nreads; nreads = 0; gvalid = 0; nsnap = 0;
    memcpy(pl[np], p, n); pls[np++] = n;
    qsend_frames(pl, pls, np);
    for (int i = 0; i < np - 1; i++) qpacket(rep);
    if (ack) wall(G.fd, "+", 1);
    int sn;
    for (;;) {
        if (Q.pos < Q.len) { int ev = next(&Q, rep, &sn); if (ev == 1) break; continue; }
        struct pollfd f[2] = {{Q.fd, POLLIN, 0}, {G.fd, POLLIN, 0}};
        poll(f, 2, -1);
        if (f[1].revents) { int gn; fill(&G); while (G.pos < G.len) { if (G.buf[G.pos] == 3) { G.pos++; wall(Q.fd, "\3", 1); } else if (G.buf[G.pos] == '$') { next(&G, tmp, &gn); } else G.pos++; } }
        if (f[0].revents) { fill(&Q); }
    }
    owed = 1;
    if (rep[0] != 'T') { greply(rep, sn); return; }
    char stop[512]; memcpy(stop, rep, sn + 1);
    np = 0; pls[np] = sprintf(pl[np], "g"); np++;
    for (int i = 0; i < npref; i++) pls[np] = sprintf(pl[np], "m%lx,%lx", pref[i][0], pref[i][1]), np++;
    qsend_frames(pl, pls, np);
    int gn = qpacket(gcache); gcache[gn] = 0; gvalid = 1;
    for (int i = 1; i < np; i++) {
        int mn = qpacket(snap[nsnap]); snap[nsnap][mn] = 0;
        snapk[nsnap][0] = pref[i - 1][0]; snapk[nsnap][1] = pref[i - 1][1]; nsnap++;
    }
    int k = 3; memcpy(tmp, stop, 3);
    k += step ? expedite(tmp + k, three, nthree) : expedite(tmp + k, regs, nregs);
    memcpy(tmp + k, stop + 3, sn - 3); k += sn - 3;
    greply(tmp, k);
}
static void parse_regs(char *s, int (*r)[3], int *n) {
    for (char *t = strtok(s, ","); t; t = strtok(NULL, ",")) { sscanf(t, "%d:%d:%d", &r[*n][0], &r[*n][1], &r[*n][2]); (*n)++; }
}
int main(int argc, char **argv) {
    owed = atoi(argv[1]);
    parse_regs(argv[2], regs, &nregs); parse_regs(argv[3], three, &nthree);
    snprintf(threads, sizeof threads, "%s", argv[4]);
    Q.fd = 3;
    G.fd = accept(4, NULL, NULL); if (G.fd < 0) die("accept");
    char xml[1024]; int xl = sprintf(xml, "<?xml version=\"1.0\"?><threads>");
    { char t[256]; snprintf(t, sizeof t, "%s", threads); for (char *s = strtok(t, ","); s; s = strtok(NULL, ",")) xl += sprintf(xml + xl, "<thread id=\"%s\"/>", s); }
    xl += sprintf(xml + xl, "</threads>");
    for (;;) {
        int n, ev = next(&G, pkt, &n);
        if (ev != 1) continue;
        if (!strncmp(pkt, "qSupported", 10)) { const char *f = "PacketSize=1000;qXfer:features:read+;qXfer:threads:read+;vContSupported+;QStartNoAckMode+"; greply(f, strlen(f)); }
        else if (!strcmp(pkt, "QStartNoAckMode")) { greply("OK", 2); ack = 0; }
        else if ((pkt[0] == 'Z' || pkt[0] == 'z') && pkt[1] == '0' && pkt[2] == ',') {
            unsigned long a, k; sscanf(pkt + 3, "%lx,%lx", &a, &k);
            if (pkt[0] == 'Z') { if (!has(wanted, nwanted, a, k)) { wanted[nwanted][0] = a; wanted[nwanted][1] = k; nwanted++; } }
            else for (int i = 0; i < nwanted; i++) if (wanted[i][0] == a && wanted[i][1] == k) { wanted[i][0] = wanted[nwanted - 1][0]; wanted[i][1] = wanted[nwanted - 1][1]; nwanted--; break; }
            greply("OK", 2);
        }
        else if (!strncmp(pkt, "vCont;", 6) || !strcmp(pkt, "c") || !strcmp(pkt, "s"))
            resume(pkt, n, strstr(pkt, ";s") != NULL || !strcmp(pkt, "s"));
        else if (!strcmp(pkt, "g") && gvalid) greply(gcache, strlen(gcache));
        else if (!strncmp(pkt, "qXfer:threads:read::", 20)) {
            unsigned long off, len; sscanf(pkt + 20, "%lx,%lx", &off, &len);
            if (off > (unsigned long)xl) off = xl;
            unsigned long m = xl - off < len ? xl - off : len;
            tmp[0] = off + len >= (unsigned long)xl ? 'l' : 'm'; memcpy(tmp + 1, xml + off, m); greply(tmp, m + 1);
        }
        else if (!strcmp(pkt, "qfThreadInfo")) { int k = sprintf(tmp, "m%s", threads); greply(tmp, k); }
        else if (!strcmp(pkt, "qsThreadInfo")) greply("l", 1);
        else if (pkt[0] == 'm' && !strchr(pkt, ':')) {
            unsigned long a, k; sscanf(pkt + 1, "%lx,%lx", &a, &k);
            if (!has(reads, nreads, a, k) && nreads < 8) { reads[nreads][0] = a; reads[nreads][1] = k; nreads++; }
            int hit = -1; for (int i = 0; i < nsnap; i++) if (snapk[i][0] == a && snapk[i][1] == k) hit = i;
            if (hit >= 0) greply(snap[hit], strlen(snap[hit]));
            else {
                memcpy(pl[0], pkt, n); pls[0] = n; qsend_frames(pl, pls, 1); int rn = qpacket(rep); rep[rn] = 0;
                if (gvalid && nsnap < 8 && rn < 8000) { memcpy(snap[nsnap], rep, rn + 1); snapk[nsnap][0] = a; snapk[nsnap][1] = k; nsnap++; }
                greply(rep, rn);
            }
        }
        else if (!strcmp(pkt, "D")) {
            int np = 0; for (int i = 0; i < ninstalled; i++) pls[np] = sprintf(pl[np], "z0,%lx,%lx", installed[i][0], installed[i][1]), np++;
            if (np) { qsend_frames(pl, pls, np); for (int i = 0; i < np; i++) qpacket(rep); }
            greply("OK", 2); pls[0] = sprintf(pl[0], "D"); qsend_frames(pl, pls, 1); return 0;
        }
        else {
            if (strchr("GPMX", pkt[0])) { gvalid = 0; nsnap = 0; }
            /* forwarded (by hand: a long packet would not fit pl) */
            int k = 0; if (owed) { wbuf[k++] = '+'; owed = 0; }
            k += frame(wbuf + k, pkt, n); wall(Q.fd, wbuf, k);
            int rn = qpacket(rep); greply(rep, rn);
        }
    }
}
