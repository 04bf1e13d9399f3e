-- wrk script: prints one machine-readable line when the run ends, so the harness does not
-- have to parse wrk's human-readable report. Loaded on its own for the unpaced runs, and by
-- wrk-paced.lua for the paced ones.
--
-- The line is `BENCH_JSON {...}` with the request count, the run time, the error counters and
-- latency percentiles in microseconds (wrk measures latency from the moment a request is
-- written to the moment its response is complete).

local bench_threads = {}

function setup(thread)
   table.insert(bench_threads, thread)
end

function done(summary, latency, requests)
   local late, slots = 0, 0
   for _, t in ipairs(bench_threads) do
      late = late + (tonumber(t:get("bench_late")) or 0)
      slots = slots + (tonumber(t:get("bench_slots")) or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"mean":%.1f,"max":%d},' ..
      '"paced":{"slots":%d,"late":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max,
      slots, late))
end
