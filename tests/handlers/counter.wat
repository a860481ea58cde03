;; Counts its invocations in state key `n` (u64 little-endian) and forwards nothing.
(module
  (import "tidepool" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_put" (func $put (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "n")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (i64.store (i32.const 16) (i64.const 0))
    (drop (call $get (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 8)))
    (i64.store (i32.const 16) (i64.add (i64.load (i32.const 16)) (i64.const 1)))
    (call $put (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 8))))
