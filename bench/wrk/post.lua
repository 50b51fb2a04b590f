-- wrk script: POST one fixed body read from a file, and print a machine-readable summary.
-- Arguments (after `--`): body_file content_type [inference_header_content_length]
-- The summary line starts with BENCH_JSON; latencies are in microseconds.

function init(args)
   local file = assert(io.open(args[1], "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[2]
   if args[3] ~= nil and args[3] ~= "" then
      wrk.headers["Inference-Header-Content-Length"] = args[3]
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
      '"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
