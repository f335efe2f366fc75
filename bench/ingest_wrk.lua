-- wrk script for the ingest benchmark: pre-formatted, pre-signed WeCom app callbacks.
--   wrk -t1 -c64 -d15s -s bench/ingest_wrk.lua http://127.0.0.1:PORT -- REQUESTS_FILE NTHREADS
-- REQUESTS_FILE: one request a line, "<path?query>\t<body>" (bench/ingest.py writes it). Each wrk
-- thread takes every NTHREADS-th line and formats all of them in init(), so request() only hands out
-- a ready string; a thread that runs out starts again from its first (the summary counts the wraps).

local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

local reqs = {}
local idx = 0
wraps = 0
bad = 0
nreqs = 0

function init(args)
  local file, nthreads = args[1], tonumber(args[2])
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid then
      local path, body = line:match("^([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", path, { ["Content-Type"] = "text/xml" }, body)
    end
    i = i + 1
  end
  nreqs = #reqs
end

function request()
  idx = idx + 1
  if idx > #reqs then
    idx = 1
    wraps = wraps + 1
  end
  return reqs[idx]
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local w, b, n = 0, 0, 0
  for _, t in ipairs(threads) do
    w = w + t:get("wraps")
    b = b + t:get("bad")
    n = n + t:get("nreqs")
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_200": %d, "socket_errors": %d, "wraps": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, "prepared": %d}\n',
    summary.requests, summary.duration, b,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    w, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean, n))
end
