/*
 * The pod sandbox's process for capsid's CRI tests (what registry.k8s.io/pause
 * is to Kubernetes): holds the pod's namespaces, reaps children it inherits
 * as PID 1 of a shared PID namespace, and exits 0 on SIGINT or SIGTERM.
 * Built static by images/build-oci.py into the `pause` image.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction term = {.sa_handler = stop};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigemptyset(&term.sa_mask);
    sigemptyset(&child.sa_mask);
    if (sigaction(SIGINT, &term, NULL) || sigaction(SIGTERM, &term, NULL) ||
        sigaction(SIGCHLD, &child, NULL)) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
