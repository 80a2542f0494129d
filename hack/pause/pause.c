/* The pod sandbox process for the local node's containerd (sandbox_image): it holds the pod's
 * namespaces open and does nothing else. Sleeps in pause(), reaps any child that gets
 * re-parented to it (it is PID 1 of the pod's PID namespace when that is shared), and exits 0
 * on SIGTERM or SIGINT. Built by hack/images.sh with `gcc -static` into an image FROM scratch. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
  (void)sig;
  _exit(0);
}

static void on_child(int sig) {
  int saved = errno;
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("fto-pause 1");
    return 0;
  }
  if (getpid() != 1)
    fputs("pause: warning: not running as PID 1\n", stderr);

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = on_stop;
  if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
    return 1;
  sa.sa_handler = on_child;
  sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGCHLD, &sa, NULL) < 0)
    return 2;

  for (;;)
    pause();
}
