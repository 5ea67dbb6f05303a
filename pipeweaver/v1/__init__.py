"""Generated code for the v1 wire contract (proto/pipeweaver/v1/); regenerate with scripts/gen_proto.sh.

Import `pipeweaver.v1.planner_pb2` for messages (no grpc needed) and `planner_pb2_grpc` for the service stubs.
"""
