;; Counts its invocations in state key `n` (u64 little-endian) and forwards every event as is,
;; class normal. Each kept event: one state increment and one outbox entry, in one write.
(module
  (import "tidepool" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_put" (func $put (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "n")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param $t i32) (param $tl i32) (param $p i32) (param $pl i32) (result i32)
    (i64.store (i32.const 16) (i64.const 0))
    (drop (call $get (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 8)))
    (i64.store (i32.const 16) (i64.add (i64.load (i32.const 16)) (i64.const 1)))
    (drop (call $put (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 8)))
    (call $fwd (local.get $t) (local.get $tl) (local.get $p) (local.get $pl) (i32.const 1))))
