farm-bench 3 | 2026-12-02, 2c/24GiB | Intel(R) Xeon(R) Processor | not pinned (no --pin CPUS) | peak floor about 11.2 MiB | quote the median
A = .venv/bin/sharding-roofline plan --hardware tpu-v5p --topology 16x16x16 --mesh x=16,y=16,z=16 --einsum bd,df- --dims b=8192,d=8192,f=32768 --json --top 1000
B = .venv/bin/sharding-roofline hardware list --json
runs counted: A 5, B 5, in turn (A B A B ...); warm-up runs asked for, not counted: 1 each; the whole call stops at 100 s (change it with --timeout)
A exit 1 (5 of 5); its output was read and thrown away (117 bytes in the last run)
B exit 0 (5 of 5); its output was read and thrown away (25601 bytes in the last run)
                     min      median         max   n: A 5, B 5; whole process
A user s           0.106       0.108       0.118
A sys s            0.008       0.019       0.020
A cpu s            0.124       0.126       0.132
A wall s           0.160       0.194       0.209
A peak MiB          18.0        18.1        18.2
B user s           0.102       0.119       0.139
B sys s            0.000       0.015       0.031
B cpu s            0.131       0.139       0.141
B wall s           0.178       0.205       0.234
B peak MiB          18.0        18.2        18.3
A/B user          0.7712      0.9893      1.0559
A/B cpu           0.8949      0.9349      0.9574
A/B wall          0.6902      0.9214      1.0879
