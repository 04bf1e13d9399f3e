-- wrk script: a fixed request rate (open-loop pacing), for latency at a given load.
--
-- Usage: wrk -t1 -c16 -s wrk-paced.lua URL -- RATE
--
-- How it paces: wrk asks the script's `delay()` how many milliseconds to wait before each
-- request, on every connection. Each thread keeps one schedule of send slots, RATE/threads per
-- second, starting when its first connection asks. Every `delay()` call claims the next free
-- slot and waits until that slot's time (read from CLOCK_MONOTONIC through LuaJIT's FFI), so
-- the connections together send at the fixed rate whatever the response times are, as long
-- as a connection is free when a slot comes (16 connections at 1,000 rps leave 16 ms per
-- request). A slot claimed more than 1 ms after its time counts as late: the harness reports
-- the late fraction, and a high one means the rate was not held (then latencies understate
-- the queueing, as with any closed-loop generator). wrk's timer has 1 ms resolution, so a
-- request leaves at most 1 ms before its slot; the mean rate is exact.

local ffi = require("ffi")
pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
   return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/wrk-report.lua")

local interval_ms = 1
local next_slot = nil
bench_late = 0
bench_slots = 0

function init(args)
   local rate = tonumber(args[1]) or 1000
   local threads = tonumber(args[2]) or 1
   interval_ms = 1000 * threads / rate
end

function delay()
   local now = now_ms()
   if next_slot == nil then
      next_slot = now
   end
   local slot = next_slot
   next_slot = next_slot + interval_ms
   bench_slots = bench_slots + 1
   local wait = slot - now
   if wait < -1 then
      bench_late = bench_late + 1
   end
   if wait <= 0 then
      return 0
   end
   return math.floor(wait)
end
