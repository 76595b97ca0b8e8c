/* The default clock of the local tier; tiercache/_clock.py reads the same clock id. */
#include <time.h>
#ifdef CLOCK_MONOTONIC_COARSE
#define TC_CLOCK_ID CLOCK_MONOTONIC_COARSE
#else
#define TC_CLOCK_ID CLOCK_MONOTONIC
#endif

static inline double tc_monotonic(void) {
    struct timespec ts;
    clock_gettime(TC_CLOCK_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
