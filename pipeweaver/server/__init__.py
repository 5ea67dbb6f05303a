"""The planner service: `pipeweaver serve`, a gRPC sidecar that plans every batch of a training job.

- `config`: `ServerConfig`, from flags and PIPEWEAVER_* variables;
- `app`: startup, readiness, SIGTERM; `service`: the PlannerService handlers; `forward`: follower mode;
- `planning`: registration, one search per (job, replica, iteration), deadlines, fallbacks, the online refit;
- `jobs`: job ids, the plan window, the plan cache, the checked batch contents; `validation`: request checks and
  rich error statuses; `rawproto`: protobuf bytes read and written by hand on the streaming fast path;
- `pool`: spawn worker processes behind bounded queues; `work`: what the workers run (never imports grpc);
- `metrics`: the Prometheus registry and the gRPC interceptor.

This package imports nothing on its own: `work` is imported by spawned workers, which must not load grpc.
"""
