-- The PostgreSQL connector's statements, by name (see ajs_grpc/connectors/_sql.py).
--
-- A query is introduced by "-- name: NAME" and one line of why. Parameters are
-- %(named)s. ${CREATED}, ${PENDING}, ${FINISHED} ... are the states of
-- ajs_grpc.core.model.RequestState, ${JOB} selects a job with its last Response and its lease
-- token (one row layout for every SQL connector, ajs_grpc/connectors/_sql.py). Leases
-- and due times are compared with the database's clock (clock_timestamp()), never an
-- instance's, so clock skew between instances cannot expire a lease early: "now" is
-- COALESCE(%(now)s::timestamptz, clock_timestamp()), and %(now)s is NULL unless the
-- connector was given a clock of its own (tests move time forward with one).

-- name: migration_1
-- Schema version 1: jobs and their Responses; partial indexes for the queue's hot paths.
CREATE TABLE schema_version (
    version      integer PRIMARY KEY,
    applied_time timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE jobs (
    position         bigserial PRIMARY KEY,
    id               text        NOT NULL UNIQUE,
    parent_id        text        NOT NULL,
    type             text        NOT NULL,
    creator          text        NOT NULL,
    create_time      timestamptz NOT NULL,
    data             jsonb       NOT NULL,
    input_type_url   text,
    input_value      bytea,
    priority         integer     NOT NULL,
    run_after        timestamptz,
    max_attempts     integer     NOT NULL,
    state            smallint    NOT NULL,
    attempt          integer     NOT NULL,
    cancel_requested boolean     NOT NULL,
    update_time      timestamptz NOT NULL,
    due_time         timestamptz,
    last_sequence    integer     NOT NULL,
    lease_token      text,
    lease_expires    timestamptz,
    worker           text
);
CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = ${CREATED};
CREATE INDEX jobs_due ON jobs (due_time) WHERE state = ${CREATED};
CREATE INDEX jobs_leases ON jobs (lease_expires) WHERE state = ${PENDING};
CREATE INDEX jobs_ended ON jobs (update_time) WHERE state >= ${FINISHED};
CREATE INDEX jobs_parent ON jobs (parent_id, position) WHERE parent_id <> '';
CREATE INDEX jobs_state ON jobs (state, position);
CREATE TABLE responses (
    position          bigint      NOT NULL REFERENCES jobs (position) ON DELETE CASCADE,
    sequence          integer     NOT NULL,
    create_time       timestamptz NOT NULL,
    state             smallint    NOT NULL,
    is_final          boolean     NOT NULL,
    data              jsonb       NOT NULL,
    output_type_url   text,
    output_value      bytea,
    progress_fraction double precision,
    progress_message  text,
    error             jsonb,
    PRIMARY KEY (position, sequence)
)

-- name: migration_2
-- Schema version 2: queues (paused ones in their own table) and flow control. A job's resolved
-- policies are stored with it (ajs_grpc.core.model.Flow); "gated" jobs (a concurrency, rate or
-- order policy) are claimed apart from the others, under one lock (claim_gate_lock).
ALTER TABLE jobs ADD COLUMN queue text NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN gated boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN concurrency_key text;
ALTER TABLE jobs ADD COLUMN concurrency_limit integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN rate_key text;
ALTER TABLE jobs ADD COLUMN rate double precision NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN burst integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN ordered_key text;
ALTER TABLE jobs ADD COLUMN unique_key text;
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = ${CREATED} AND NOT gated;
CREATE INDEX jobs_gated ON jobs (priority DESC, position) WHERE state = ${CREATED} AND gated;
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (due_time) WHERE state = ${CREATED} AND NOT gated;
CREATE INDEX jobs_gated_due ON jobs (due_time) WHERE state = ${CREATED} AND gated;
CREATE INDEX jobs_rate_keys ON jobs (rate_key, due_time) WHERE state = ${CREATED} AND rate_key IS NOT NULL;
CREATE INDEX jobs_running_keys ON jobs (concurrency_key) WHERE state = ${PENDING} AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_ordered ON jobs (ordered_key, position) WHERE state < ${FINISHED} AND ordered_key IS NOT NULL;
CREATE INDEX jobs_unique ON jobs (unique_key, position) WHERE unique_key IS NOT NULL;
CREATE INDEX jobs_queue ON jobs (queue, state) WHERE state < ${FINISHED};
CREATE TABLE queues (
    name        text PRIMARY KEY,
    paused      boolean     NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE rate_buckets (
    key         text PRIMARY KEY,
    tokens      double precision NOT NULL,
    update_time timestamptz      NOT NULL
)

-- name: migration_3
-- Schema version 3: workflows. A job's dependencies (ids joined by spaces, which ids never hold)
-- and, to find the waiting jobs that name a job, one row per edge; whether a job has dependents
-- (so the end of one without is not slowed); expiry; per-request attempts and timeout; schedules.
ALTER TABLE jobs ADD COLUMN depends_on text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN allow_failed_deps boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN has_dependents boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN expire_time timestamptz;
ALTER TABLE jobs ADD COLUMN request_max_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN timeout double precision;
CREATE INDEX jobs_expiring ON jobs (expire_time) WHERE state = ${CREATED} AND expire_time IS NOT NULL;
CREATE TABLE dependencies (
    depends_on text NOT NULL,
    request_id text NOT NULL,
    PRIMARY KEY (depends_on, request_id)
);
CREATE INDEX dependencies_of ON dependencies (request_id);
CREATE TABLE schedules (
    id          text        PRIMARY KEY,
    cron        text        NOT NULL,
    time_zone   text        NOT NULL,
    template    text        NOT NULL,
    overlap     smallint    NOT NULL,
    catchup     smallint    NOT NULL,
    paused      boolean     NOT NULL,
    creator     text        NOT NULL,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    last_time   timestamptz,
    last_job_id text        NOT NULL
)

-- name: migration_4
-- Schema version 4: the feed of every job's Responses (WatchJobs). Each Response records the
-- transaction that stored it; the feed reads in (xid, position, sequence) order and only below
-- the oldest transaction still open, so a Response committed later never comes before one read
-- (a sequence's order is not commit order; this is).
-- A job's next Response is labelled with at least its previous one's id (${FEED_XID}): a transaction
-- that got its id early and stores a job's Response after another committed one for that job
-- would otherwise come first. The label is never below the writer's own id, so the horizon holds.
-- feed_store names this store in its tokens: a token of another store (or of this one before a
-- restore) is refused rather than read past.
ALTER TABLE responses ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX responses_feed ON responses (xid, position, sequence);
CREATE TABLE feed_store (id text NOT NULL);
INSERT INTO feed_store VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16))

-- name: find_job
-- A job by id, for reads and for the idempotence check of a submit.
${JOB} WHERE j.id = %(id)s

-- name: find_jobs
-- Jobs by id, for the idempotence check of a batch of submits.
${JOB} WHERE j.id = ANY(%(ids)s::text[])

-- name: find_job_locked
-- A job about to change: locked alone first, then read with its last Response. The lock is
-- alone on purpose: FOR UPDATE in a statement that joins the last Response re-checks only the
-- locked row after waiting (EvalPlanQual), with the old Response, and loses the job; the next
-- statement sees what the other committed.
SELECT position FROM jobs WHERE id = %(id)s FOR UPDATE;
${JOB} WHERE j.id = %(id)s

-- name: jobs_at
-- Jobs by position, read after they were locked.
${JOB} WHERE j.position = ANY(%(positions)s::bigint[]) ORDER BY j.position

-- name: job_exists
-- Whether a parent named by a submit exists.
SELECT 1 FROM jobs WHERE id = %(id)s

-- name: insert_job
-- A new job and its first Response, in one round trip.
WITH added AS (
    INSERT INTO jobs (id, parent_id, type, creator, create_time, data, input_type_url, input_value, priority,
                      run_after, max_attempts, state, attempt, cancel_requested, update_time, due_time,
                      last_sequence, queue, gated, concurrency_key, concurrency_limit, rate_key, rate, burst,
                      ordered_key, unique_key, depends_on, allow_failed_deps, expire_time, request_max_attempts,
                      timeout)
    VALUES (%(id)s, %(parent_id)s, %(type)s, %(creator)s, %(create_time)s, %(data)s, %(input_type_url)s,
            %(input_value)s, %(priority)s, %(run_after)s, %(max_attempts)s, %(state)s, %(attempt)s,
            %(cancel_requested)s, %(update_time)s, %(due_time)s, %(sequence)s, %(queue)s, %(gated)s,
            %(concurrency_key)s, %(concurrency_limit)s, %(rate_key)s, %(rate)s, %(burst)s, %(ordered_key)s,
            %(unique_key)s, %(depends_on)s, %(allow_failed_deps)s, %(expire_time)s, %(request_max_attempts)s,
            %(timeout)s)
    RETURNING position)
INSERT INTO responses
SELECT added.position, %(sequence)s, %(r_create_time)s, %(r_state)s, %(r_is_final)s, %(r_data)s,
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s
  FROM added

-- name: save_job
-- A running job's new Response (progress): its lease stays.
WITH saved AS (
    UPDATE jobs SET state = %(state)s, attempt = %(attempt)s, cancel_requested = %(cancel_requested)s,
                    update_time = %(update_time)s, due_time = %(due_time)s, last_sequence = %(sequence)s
     WHERE position = %(position)s RETURNING position)
INSERT INTO responses
SELECT saved.position, %(sequence)s, %(r_create_time)s, %(r_state)s, %(r_is_final)s, %(r_data)s,
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s,
       ${FEED_XID}
  FROM saved

-- name: save_job_claimed
-- A job claimed: PENDING under a new lease of %(lease_seconds)s on the database's clock.
WITH saved AS (
    UPDATE jobs SET state = %(state)s, attempt = %(attempt)s, cancel_requested = %(cancel_requested)s,
                    update_time = %(update_time)s, due_time = %(due_time)s, last_sequence = %(sequence)s,
                    lease_token = %(lease_token)s,
                    lease_expires = COALESCE(%(now)s::timestamptz, clock_timestamp())
                                    + %(lease_seconds)s * interval '1 second',
                    worker = %(worker)s
     WHERE position = %(position)s RETURNING position)
INSERT INTO responses
SELECT saved.position, %(sequence)s, %(r_create_time)s, %(r_state)s, %(r_is_final)s, %(r_data)s,
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s,
       ${FEED_XID}
  FROM saved

-- name: save_job_released
-- A job no longer running (queued again, or ended): its lease is released.
WITH saved AS (
    UPDATE jobs SET state = %(state)s, attempt = %(attempt)s, cancel_requested = %(cancel_requested)s,
                    update_time = %(update_time)s, due_time = %(due_time)s, last_sequence = %(sequence)s,
                    lease_token = NULL, lease_expires = NULL, worker = NULL
     WHERE position = %(position)s RETURNING position)
INSERT INTO responses
SELECT saved.position, %(sequence)s, %(r_create_time)s, %(r_state)s, %(r_is_final)s, %(r_data)s,
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s,
       ${FEED_XID}
  FROM saved

-- name: claim_due
-- Due queued jobs without flow policies, highest priority first, then in submit order;
-- instances never wait for each other nor share a job (SKIP LOCKED). Only %(types)s unless
-- %(any_type)s, only %(queues)s unless %(any_queue)s, never a paused queue's.
-- The jobs are chosen and locked on their own table, then read with their last Response:
-- joined in one query, the planner misjudged the join (120 rows estimated, 190,000 found at
-- 200,000 queued) and sorted the whole queue on disk, 427 ms a claim.
WITH due AS (
    SELECT j.position FROM jobs j
     WHERE j.state = ${CREATED} AND NOT j.gated AND j.due_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
       AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
     ORDER BY j.priority DESC, j.position
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED)
${JOB}
 WHERE j.position IN (SELECT position FROM due)
 ORDER BY j.priority DESC, j.position

-- name: gated_due
-- Whether a due job with flow policies waits in scope (a claim then asks the gate first).
SELECT 1 FROM jobs j
 WHERE j.state = ${CREATED} AND j.gated AND j.due_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
   AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
 LIMIT 1

-- name: plain_cutoff
-- Where the claim of %(limit)s jobs without policies would stop (the last one's priority and
-- position): jobs with policies that come before it in claim order are asked about first.
SELECT j.priority, j.position FROM jobs j
 WHERE j.state = ${CREATED} AND NOT j.gated AND j.due_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
   AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
 ORDER BY j.priority DESC, j.position
 LIMIT 1 OFFSET %(limit)s - 1

-- name: claim_gate_lock
-- Claims of jobs with flow policies take turns across instances: each counts the running jobs
-- and takes tokens as they were committed by the one before. Held until the claim commits,
-- in a transaction of its own (so it never waits while holding another lock).
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.ajs-flow-gate'))

-- name: gated_candidates
-- A page of due jobs with flow policies in claim order, before the cutoff of the plain claim
-- (plain_cutoff) and after (%(after_priority)s,
-- %(after_position)s), with what the gate (ajs_grpc.core.flow.Gate) decides on: the running
-- jobs of their concurrency key, their rate bucket, the store's time. Left out, as the gate
-- would refuse them anyway: keys at their limit (here or in %(full_c)s / %(full_r)s) and jobs
-- that are not the first unfinished one of their ordered key.
SELECT j.position, j.priority, j.concurrency_key, j.concurrency_limit, j.rate_key, j.rate, j.burst,
       j.ordered_key, r.running, b.tokens, b.update_time, COALESCE(%(now)s::timestamptz, clock_timestamp())
  FROM jobs j
  LEFT JOIN rate_buckets b ON b.key = j.rate_key
  CROSS JOIN LATERAL (SELECT count(*) AS running FROM jobs p
                       WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key) r
 WHERE j.state = ${CREATED} AND j.gated AND j.due_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
   AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
   AND (j.priority < %(after_priority)s OR (j.priority = %(after_priority)s AND j.position > %(after_position)s))
   AND (j.priority > %(cut_priority)s OR (j.priority = %(cut_priority)s AND j.position < %(cut_position)s))
   AND (j.concurrency_key IS NULL
        OR (NOT j.concurrency_key = ANY(%(full_c)s::text[]) AND r.running < j.concurrency_limit))
   AND (j.rate_key IS NULL OR NOT j.rate_key = ANY(%(full_r)s::text[]))
   AND (j.ordered_key IS NULL
        OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                AND o.state < ${FINISHED} AND o.position < j.position))
 ORDER BY j.priority DESC, j.position
 LIMIT %(page)s

-- name: lock_created
-- The jobs the gate admitted, locked and read in one statement (one locked by another write,
-- a cancel, is passed over; a second statement would see it again and wait for it).
WITH locked AS (
    SELECT position FROM jobs WHERE position = ANY(%(positions)s::bigint[]) AND state = ${CREATED}
     ORDER BY position FOR UPDATE SKIP LOCKED)
${JOB} WHERE j.position IN (SELECT position FROM locked)
 ORDER BY j.priority DESC, j.position

-- name: save_bucket
-- A rate key's token bucket after a claim took tokens from it.
INSERT INTO rate_buckets (key, tokens, update_time) VALUES (%(key)s, %(tokens)s, %(update_time)s)
    ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, update_time = excluded.update_time

-- name: lock_unique
-- A submit with a unique key holds it until its commit, so that concurrent submits of the key
-- (on any instance) see each other's job.
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.ajs-unique'), hashtext(%(key)s))

-- name: find_unique
-- The newest job of a unique key in %(states)s, or created since %(since)s.
${JOB}
 WHERE j.unique_key = %(key)s
   AND (j.state = ANY(%(states)s::smallint[]) OR j.create_time >= %(since)s)
 ORDER BY j.position DESC
 LIMIT 1

-- name: renew_leases
-- Extends the leases still held ({id: token} in %(leases)s); says which were asked to cancel.
UPDATE jobs j
   SET lease_expires = COALESCE(%(now)s::timestamptz, clock_timestamp()) + %(lease_seconds)s * interval '1 second'
  FROM jsonb_each_text(%(leases)s) AS held(id, token)
 WHERE j.id = held.id AND j.lease_token = held.token AND j.state = ${PENDING}
RETURNING j.id, j.cancel_requested

-- name: expired_jobs
-- Running jobs whose lease ran out on the database's clock; any instance recovers them.
${JOB} WHERE j.state = ${PENDING} AND j.lease_expires <= COALESCE(%(now)s::timestamptz, clock_timestamp())
   FOR UPDATE OF j SKIP LOCKED

-- name: next_due
-- When a claim in scope may next find work, and the database's clock it compares with: the
-- earliest due time of jobs without flow policies, of jobs with them not yet due, and of the
-- next token of buckets a claim emptied that due jobs wait on (only those no concurrency or
-- order policy holds back: the time may have passed, and such a job is claimable then); the
-- earliest of the three is taken. Jobs held back by a concurrency or order policy start when
-- the job before them ends: its end wakes the dispatchers.
WITH clock AS (SELECT COALESCE(%(now)s::timestamptz, clock_timestamp()) AS now)
SELECT (SELECT min(j.due_time) FROM jobs j WHERE j.state = ${CREATED} AND NOT j.gated AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)),
         (SELECT min(j.due_time) FROM jobs j, clock
           WHERE j.state = ${CREATED} AND j.gated AND j.due_time > clock.now AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)),
         (SELECT min(b.update_time + (1 - b.tokens) / j.rate * interval '1 second')
            FROM rate_buckets b JOIN jobs j ON j.rate_key = b.key, clock
           WHERE b.tokens < 1 AND j.state = ${CREATED} AND j.rate_key IS NOT NULL AND j.gated
             AND j.due_time <= clock.now AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
       AND (%(any_queue)s OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
             AND (j.concurrency_key IS NULL
                  OR (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key)
                     < j.concurrency_limit)
             AND (j.ordered_key IS NULL
                  OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                          AND o.state < ${FINISHED} AND o.position < j.position))),
       (SELECT now FROM clock)

-- name: cancel_tree
-- Locks a job and its unfinished descendants, to cancel them together.
WITH RECURSIVE tree(id) AS (SELECT %(id)s::text UNION SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id)
SELECT position FROM jobs WHERE id IN (SELECT id FROM tree) AND state IN (${CREATED}, ${PENDING})
 ORDER BY position FOR UPDATE

-- name: mark_cancel_requested
-- A running job a client cancelled: its dispatcher (on any instance) stops it.
UPDATE jobs SET cancel_requested = true WHERE position = %(position)s

-- name: delete_ended
-- Ended jobs older than %(before)s without children left (leaves first: run until none is left).
DELETE FROM jobs j WHERE state >= ${FINISHED} AND update_time < %(before)s
   AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id)

-- name: list_jobs
-- A page of jobs in submit order after cursor %(after)s; an empty filter matches anything.
${JOB}
 WHERE j.position > %(after)s
   AND (cardinality(%(states)s::smallint[]) = 0 OR j.state = ANY(%(states)s::smallint[]))
   AND (cardinality(%(types)s::text[]) = 0 OR j.type = ANY(%(types)s::text[]))
   AND (%(parent_id)s = '' OR j.parent_id = %(parent_id)s)
   AND (%(creator)s = '' OR j.creator = %(creator)s)
 ORDER BY j.position
 LIMIT %(limit)s

-- name: list_jobs_newest_first
-- A page of jobs, newest first, before cursor %(after)s; an empty filter matches anything.
${JOB}
 WHERE j.position < %(after)s
   AND (cardinality(%(states)s::smallint[]) = 0 OR j.state = ANY(%(states)s::smallint[]))
   AND (cardinality(%(types)s::text[]) = 0 OR j.type = ANY(%(types)s::text[]))
   AND (%(parent_id)s = '' OR j.parent_id = %(parent_id)s)
   AND (%(creator)s = '' OR j.creator = %(creator)s)
 ORDER BY j.position DESC
 LIMIT %(limit)s

-- name: count_jobs
-- Jobs in one state (the queue depth, a principal's queued jobs).
SELECT count(*) FROM jobs WHERE state = %(state)s AND (%(creator)s = '' OR creator = %(creator)s)

-- name: responses_after
-- A job's stored Responses after a sequence, in order (a page of a watch).
SELECT ${RESPONSE_COLUMNS} FROM responses r JOIN jobs j ON j.position = r.position
 WHERE j.id = %(id)s AND r.sequence > %(after)s ORDER BY r.sequence LIMIT %(limit)s

-- name: feed_horizon
-- Where the feed may be read up to: below the oldest transaction still open (each transaction
-- below it has ended, so no Response can appear there any more) but for those of other databases,
-- which cannot write here (a session of this database names them by their id's low 32 bits);
-- the newest Response's label; this store's id; and the next transaction id (no token is beyond).
WITH s AS (SELECT pg_current_snapshot() AS snap)
SELECT coalesce(
           (SELECT min(x) FROM s, pg_snapshot_xip(s.snap) AS x
             WHERE (x::text::numeric %% 4294967296)::bigint NOT IN (
                   SELECT backend_xid::text::bigint FROM pg_stat_activity
                    WHERE backend_xid IS NOT NULL AND datname IS NOT NULL AND datname <> current_database())),
           (SELECT pg_snapshot_xmax(snap) FROM s))::text,
       (SELECT xid FROM responses ORDER BY xid DESC LIMIT 1)::text,
       (SELECT id FROM feed_store),
       (SELECT pg_snapshot_xmax(snap) FROM s)::text

-- name: feed
-- The feed's matching Responses after place (%(k)s, %(position)s, %(sequence)s), below the horizon.
SELECT r.xid::text, r.position, j.id, j.type, j.queue, j.creator, j.parent_id, ${RESPONSE_COLUMNS}
  FROM responses r JOIN jobs j ON j.position = r.position
 WHERE (r.xid, r.position, r.sequence) > (%(k)s::text::xid8, %(position)s, %(sequence)s)
   AND r.xid < %(bound)s::text::xid8
   AND (cardinality(%(states)s::smallint[]) = 0 OR r.state = ANY(%(states)s::smallint[]))
   AND (cardinality(%(types)s::text[]) = 0 OR j.type = ANY(%(types)s::text[]))
   AND (cardinality(%(queues)s::text[]) = 0 OR j.queue = ANY(%(queues)s::text[]))
   AND (%(parent_id)s = '' OR j.parent_id = %(parent_id)s)
   AND (%(creator)s = '' OR j.creator = %(creator)s)
 ORDER BY r.xid, r.position, r.sequence
 LIMIT %(limit)s

-- name: set_paused
-- Pauses or resumes a queue; every instance's next claim sees it.
INSERT INTO queues (name, paused, update_time) VALUES (%(name)s, %(paused)s, clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, update_time = excluded.update_time

-- name: list_queues
-- Every queue with unfinished jobs or paused: waiting and running jobs, the oldest waiting one.
SELECT name, sum(queued)::bigint, sum(running)::bigint, bool_or(paused), min(oldest) FROM (
    SELECT queue AS name, count(*) FILTER (WHERE state = ${CREATED}) AS queued,
           count(*) FILTER (WHERE state = ${PENDING}) AS running, false AS paused,
           min(create_time) FILTER (WHERE state = ${CREATED}) AS oldest
      FROM jobs WHERE state < ${FINISHED} GROUP BY queue
    UNION ALL
    SELECT name, 0, 0, paused, NULL FROM queues WHERE paused
) found GROUP BY name ORDER BY name

-- name: held_back
-- Due queued jobs held back now, by cause: a paused queue, then a full concurrency key, then an
-- unfinished earlier job of the ordered key, then an empty rate bucket (each counted once).
WITH clock AS (SELECT COALESCE(%(now)s::timestamptz, clock_timestamp()) AS now),
causes AS (
    SELECT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused) AS paused,
           (j.concurrency_key IS NOT NULL
            AND (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key)
                >= j.concurrency_limit) AS concurrency,
           (j.ordered_key IS NOT NULL
            AND EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                AND o.state < ${FINISHED} AND o.position < j.position)) AS ordered,
           (b.key IS NOT NULL AND b.tokens + extract(epoch FROM clock.now - b.update_time) * j.rate < 1) AS rate
      FROM jobs j CROSS JOIN clock LEFT JOIN rate_buckets b ON b.key = j.rate_key
     WHERE j.state = ${CREATED} AND j.due_time <= clock.now
       AND (j.gated OR EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)))
SELECT count(*) FILTER (WHERE paused),
       count(*) FILTER (WHERE NOT paused AND concurrency),
       count(*) FILTER (WHERE NOT paused AND NOT concurrency AND ordered),
       count(*) FILTER (WHERE NOT paused AND NOT concurrency AND NOT ordered AND rate)
  FROM causes

-- name: add_dependencies
-- The edges of new jobs with dependencies, and the mark on what they depend on. The mark's row
-- lock orders this submit with the dependency's end: whichever commits second sees the other.
INSERT INTO dependencies VALUES (%(depends_on)s, %(request_id)s);
UPDATE jobs SET has_dependents = true WHERE id = %(depends_on)s

-- name: waiting_dependents
-- The jobs waiting for a job that just ended, locked alone first (see find_job_locked), then read.
SELECT position FROM jobs
 WHERE id IN (SELECT request_id FROM dependencies WHERE depends_on = %(id)s)
   AND state = ${CREATED} AND due_time IS NULL
 ORDER BY position FOR UPDATE;
${JOB} WHERE j.id IN (SELECT request_id FROM dependencies WHERE depends_on = %(id)s)
   AND j.state = ${CREATED} AND j.due_time IS NULL
 ORDER BY j.position

-- name: release_job
-- A waiting job whose dependencies all ended: due from now on.
UPDATE jobs SET due_time = %(due_time)s WHERE position = %(position)s

-- name: lapsed_jobs
-- Queued jobs past their expire_time, that no claim met: they end EXPIRED (any instance ends them).
${JOB} WHERE j.state = ${CREATED} AND j.expire_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
   FOR UPDATE OF j SKIP LOCKED

-- name: job_tree
-- Locks a job and all its descendants, to delete them together.
WITH RECURSIVE tree(id) AS (SELECT %(id)s::text UNION SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id)
SELECT position, id, state FROM jobs WHERE id IN (SELECT id FROM tree) ORDER BY position FOR UPDATE

-- name: delete_jobs
-- Jobs by position with their Responses (cascaded) and their edges.
DELETE FROM dependencies WHERE request_id IN (
    SELECT id FROM jobs WHERE position = ANY(%(positions)s::bigint[]));
DELETE FROM jobs WHERE position = ANY(%(positions)s::bigint[])

-- name: forget_dependencies
-- The edges of jobs pruned (no longer stored).
DELETE FROM dependencies d WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = d.request_id)

-- name: insert_schedule
-- A new schedule unless the id is stored (a create on another instance at once: the second waits
-- for the first's commit, inserts nothing, and then finds its schedule).
INSERT INTO schedules VALUES (%(id)s, %(cron)s, %(time_zone)s, %(template)s, %(overlap)s, %(catchup)s,
                              %(paused)s, %(creator)s, %(create_time)s, %(update_time)s, %(last_time)s,
                              %(last_job_id)s)
    ON CONFLICT (id) DO NOTHING

-- name: replace_schedule
-- Another definition of a stored schedule; its progress and pause stay.
UPDATE schedules SET cron = %(cron)s, time_zone = %(time_zone)s, template = %(template)s,
                     overlap = %(overlap)s, catchup = %(catchup)s, creator = %(creator)s,
                     update_time = %(update_time)s
 WHERE id = %(id)s

-- name: find_schedule
-- A schedule by id.
SELECT * FROM schedules WHERE id = %(id)s

-- name: list_schedules
-- A page of schedules by id after %(after)s; only %(creator)s's unless empty.
SELECT * FROM schedules WHERE id > %(after)s AND (%(creator)s = '' OR creator = %(creator)s)
 ORDER BY id LIMIT %(limit)s

-- name: delete_schedule
-- A schedule (its jobs stay).
DELETE FROM schedules WHERE id = %(id)s

-- name: pause_schedule
-- Pauses or resumes a schedule; a resumed one goes on from %(now)s.
UPDATE schedules SET paused = %(paused)s, update_time = %(now)s,
                     last_time = CASE WHEN %(paused)s THEN last_time ELSE %(now)s END
 WHERE id = %(id)s AND paused != %(paused)s

-- name: advance_schedule
-- Records a schedule's occurrences as handled if no other instance did first (compare and set).
UPDATE schedules SET last_time = %(new_last_time)s,
                     last_job_id = CASE WHEN %(last_job_id)s = '' THEN last_job_id ELSE %(last_job_id)s END
 WHERE id = %(id)s AND NOT paused AND last_time IS NOT DISTINCT FROM %(last_time)s::timestamptz

-- name: lock_dependency
-- A dependency about to be read for a retry by hand, locked: its end, on any instance, then
-- comes wholly before the read or after the retry's commit (and sees the job waiting).
UPDATE jobs SET has_dependents = true WHERE id = %(depends_on)s
