#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define BODY(I) I" %%zmm30, %%zmm31, %%zmm0\n" I" %%zmm30, %%zmm31, %%zmm1\n" I" %%zmm30, %%zmm31, %%zmm2\n" I" %%zmm30, %%zmm31, %%zmm3\n" \
 I" %%zmm30, %%zmm31, %%zmm4\n" I" %%zmm30, %%zmm31, %%zmm5\n" I" %%zmm30, %%zmm31, %%zmm6\n" I" %%zmm30, %%zmm31, %%zmm7\n" \
 I" %%zmm30, %%zmm31, %%zmm8\n" I" %%zmm30, %%zmm31, %%zmm9\n" I" %%zmm30, %%zmm31, %%zmm10\n" I" %%zmm30, %%zmm31, %%zmm11\n" \
 I" %%zmm30, %%zmm31, %%zmm12\n" I" %%zmm30, %%zmm31, %%zmm13\n" I" %%zmm30, %%zmm31, %%zmm14\n" I" %%zmm30, %%zmm31, %%zmm15\n"
#define LOOP(I) __asm__ volatile("vpxord %%zmm30,%%zmm30,%%zmm30\n vpxord %%zmm31,%%zmm31,%%zmm31\n mov %0, %%rcx\n1:\n" BODY(I) "dec %%rcx\n jnz 1b\n" :: "r"(n) : "rcx","xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13","xmm14","xmm15","xmm30","xmm31")
int main(void){ long n=50000000; double t, tf, tb, ti;
 for(int r=0;r<2;r++){
 t=now(); LOOP("vfmadd231ps"); tf=now()-t;
 t=now(); LOOP("vdpbf16ps"); tb=now()-t;
 t=now(); LOOP("vpdpbusd"); ti=now()-t;
 double k=16.0*n*1e-9;
 printf("instructions/ns: vfmadd231ps %.2f vdpbf16ps %.2f vpdpbusd %.2f | ratio bf16/fma %.2f int8/fma %.2f\n", k/tf, k/tb, k/ti, tf/tb, tf/ti);}
 return 0;}
