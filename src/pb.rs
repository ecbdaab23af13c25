//! Generated protobuf and gRPC code for the public contract in `proto/msys/v1`,
//! and the descriptor set that gRPC server reflection serves.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("msys.v1");

/// Lets `grpcurl -plaintext HOST:PORT list` work without the proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("msys_descriptor");
