//! The PostgreSQL gateway: its own wire codec (frontend and backend messages, one module
//! each), so every byte is under the gateway's control — nothing is decoded lossily and
//! nothing unparsed reaches the database.

pub mod audit;
pub mod backend;
pub mod catalog;
pub mod data_row;
pub mod frame;
pub mod frontend;
pub mod listener;
pub mod pool;
pub mod search_path;
pub mod session;
pub mod upstream;
