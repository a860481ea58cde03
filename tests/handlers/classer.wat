;; Forwards each event as is, with the class its payload's first byte names (`0` urgent,
;; `1` normal, `2` bulk).
(module
  (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 64))
  (func (export "tp_on_event") (param $t i32) (param $tl i32) (param $p i32) (param $pl i32) (result i32)
    (call $fwd (local.get $t) (local.get $tl) (local.get $p) (local.get $pl)
      (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))))
