-- The SQLite connector's statements, by name (see ajs_grpc/connectors/_sql.py).
--
-- A query is introduced by "-- name: NAME" and one line of why; it holds one statement
-- or several (run in order, the last one's rows answered). Parameters are :named.
-- ${CREATED}, ${PENDING}, ${FINISHED} ... are the states of ajs_grpc.core.model.RequestState,
-- ${JOB} selects a job with its last Response and its lease token (one row layout for
-- every SQL connector, ajs_grpc/connectors/_sql.py). Times are microseconds since the
-- epoch (integers), maps and lists JSON text. The writer thread holds the database's
-- write lock for a whole batch, so "lock" queries need no row locks here.

-- name: migration_1
-- Schema version 1: jobs and their Responses; partial indexes for the queue's hot paths.
CREATE TABLE schema_version (
    version      INTEGER PRIMARY KEY,
    applied_time INTEGER NOT NULL
);
CREATE TABLE jobs (
    position         INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    parent_id        TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    creator          TEXT    NOT NULL,
    create_time      INTEGER NOT NULL,
    data             TEXT    NOT NULL,
    input_type_url   TEXT,
    input_value      BLOB,
    priority         INTEGER NOT NULL,
    run_after        INTEGER,
    max_attempts     INTEGER NOT NULL,
    state            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL,
    update_time      INTEGER NOT NULL,
    due_time         INTEGER,
    last_sequence    INTEGER NOT NULL,
    lease_token      TEXT,
    lease_expires    INTEGER,
    worker           TEXT
);
CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = ${CREATED};
CREATE INDEX jobs_due ON jobs (due_time) WHERE state = ${CREATED};
CREATE INDEX jobs_leases ON jobs (lease_expires) WHERE state = ${PENDING};
CREATE INDEX jobs_ended ON jobs (update_time) WHERE state >= ${FINISHED};
CREATE INDEX jobs_parent ON jobs (parent_id, position) WHERE parent_id != '';
CREATE INDEX jobs_state ON jobs (state, position);
CREATE TABLE responses (
    position          INTEGER NOT NULL,
    sequence          INTEGER NOT NULL,
    create_time       INTEGER NOT NULL,
    state             INTEGER NOT NULL,
    is_final          INTEGER NOT NULL,
    data              TEXT    NOT NULL,
    output_type_url   TEXT,
    output_value      BLOB,
    progress_fraction REAL,
    progress_message  TEXT,
    error             TEXT,
    PRIMARY KEY (position, sequence)
) WITHOUT ROWID

-- name: migration_2
-- Schema version 2: queues (paused ones in their own table) and flow control. A job's resolved
-- policies are stored with it (ajs_grpc.core.model.Flow); "gated" jobs (a concurrency, rate or
-- order policy) are claimed apart from the others.
ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN gated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
ALTER TABLE jobs ADD COLUMN concurrency_limit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN rate_key TEXT;
ALTER TABLE jobs ADD COLUMN rate REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN burst INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN ordered_key TEXT;
ALTER TABLE jobs ADD COLUMN unique_key TEXT;
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = ${CREATED} AND gated = 0;
CREATE INDEX jobs_gated ON jobs (priority DESC, position) WHERE state = ${CREATED} AND gated = 1;
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (due_time) WHERE state = ${CREATED} AND gated = 0;
CREATE INDEX jobs_gated_due ON jobs (due_time) WHERE state = ${CREATED} AND gated = 1;
CREATE INDEX jobs_rate_keys ON jobs (rate_key, due_time) WHERE state = ${CREATED} AND rate_key IS NOT NULL;
CREATE INDEX jobs_running_keys ON jobs (concurrency_key) WHERE state = ${PENDING} AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_ordered ON jobs (ordered_key, position) WHERE state < ${FINISHED} AND ordered_key IS NOT NULL;
CREATE INDEX jobs_unique ON jobs (unique_key, position) WHERE unique_key IS NOT NULL;
CREATE INDEX jobs_queue ON jobs (queue, state) WHERE state < ${FINISHED};
CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL,
    update_time INTEGER NOT NULL
);
CREATE TABLE rate_buckets (
    key         TEXT PRIMARY KEY,
    tokens      REAL    NOT NULL,
    update_time INTEGER NOT NULL
)

-- name: migration_3
-- Schema version 3: workflows. A job's dependencies (ids joined by spaces, which ids never hold)
-- and, to find the waiting jobs that name a job, one row per edge; whether a job has dependents
-- (so the end of one without is not slowed); expiry; per-request attempts and timeout; schedules.
ALTER TABLE jobs ADD COLUMN depends_on TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN allow_failed_deps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN has_dependents INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN expire_time INTEGER;
ALTER TABLE jobs ADD COLUMN request_max_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN timeout REAL;
CREATE INDEX jobs_expiring ON jobs (expire_time) WHERE state = ${CREATED} AND expire_time IS NOT NULL;
CREATE TABLE dependencies (
    depends_on TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (depends_on, request_id)
) WITHOUT ROWID;
CREATE INDEX dependencies_of ON dependencies (request_id);
CREATE TABLE schedules (
    id          TEXT    PRIMARY KEY,
    cron        TEXT    NOT NULL,
    time_zone   TEXT    NOT NULL,
    template    TEXT    NOT NULL,
    overlap     INTEGER NOT NULL,
    catchup     INTEGER NOT NULL,
    paused      INTEGER NOT NULL,
    creator     TEXT    NOT NULL,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    last_time   INTEGER,
    last_job_id TEXT    NOT NULL
)

-- name: migration_4
-- Schema version 4: the feed of every job's Responses (WatchJobs). Each Response gets the next
-- feed number as it is stored (one writer at a time: numbers follow commit order); feed_floor
-- keeps the highest number ever given once Responses are deleted, so none is given twice.
-- Responses stored before this version are not in the feed. feed_floor.store names this store in
-- its tokens: a token of another store (a database made again) is refused rather than read past.
ALTER TABLE responses ADD COLUMN feed INTEGER;
CREATE INDEX responses_feed ON responses (feed);
CREATE TABLE feed_floor (n INTEGER NOT NULL, store TEXT NOT NULL);
INSERT INTO feed_floor VALUES (0, lower(hex(randomblob(8))))

-- name: find_job
-- A job by id, for reads and for the idempotence check of a submit.
${JOB} WHERE j.id = :id

-- name: find_jobs
-- Jobs by id (a JSON array), for the idempotence check of a batch of submits.
${JOB} WHERE j.id IN (SELECT value FROM json_each(:ids))

-- name: find_job_locked
-- A job about to change, in one statement (the writer already holds the database's lock).
${JOB} WHERE j.id = :id

-- name: jobs_at
-- Jobs by position, read after they were locked.
${JOB} WHERE j.position IN (SELECT value FROM json_each(:positions)) ORDER BY j.position

-- name: job_exists
-- Whether a parent named by a submit exists.
SELECT 1 FROM jobs WHERE id = :id

-- name: insert_job
-- A new job and its first Response (found by id, so that many run as two executemany calls).
INSERT INTO jobs (id, parent_id, type, creator, create_time, data, input_type_url, input_value, priority,
                  run_after, max_attempts, state, attempt, cancel_requested, update_time, due_time,
                  last_sequence, queue, gated, concurrency_key, concurrency_limit, rate_key, rate, burst,
                  ordered_key, unique_key, depends_on, allow_failed_deps, expire_time, request_max_attempts,
                  timeout)
VALUES (:id, :parent_id, :type, :creator, :create_time, :data, :input_type_url, :input_value, :priority,
        :run_after, :max_attempts, :state, :attempt, :cancel_requested, :update_time, :due_time, :sequence,
        :queue, :gated, :concurrency_key, :concurrency_limit, :rate_key, :rate, :burst, :ordered_key,
        :unique_key, :depends_on, :allow_failed_deps, :expire_time, :request_max_attempts, :timeout);
INSERT INTO responses VALUES ((SELECT position FROM jobs WHERE id = :id), :sequence, :r_create_time, :r_state,
                              :r_is_final, :r_data,
                              :r_output_type_url, :r_output_value, :r_progress_fraction, :r_progress_message,
                              :r_error, ${FEED_END} + 1)

-- name: save_job
-- A running job's new Response (progress): its lease stays.
UPDATE jobs SET state = :state, attempt = :attempt, cancel_requested = :cancel_requested,
                update_time = :update_time, due_time = :due_time, last_sequence = :sequence
 WHERE position = :position;
INSERT INTO responses VALUES (:position, :sequence, :r_create_time, :r_state, :r_is_final, :r_data,
                              :r_output_type_url, :r_output_value, :r_progress_fraction, :r_progress_message,
                              :r_error, ${FEED_END} + 1)

-- name: save_job_claimed
-- A job claimed: PENDING under a new lease of :lease_seconds from :now.
UPDATE jobs SET state = :state, attempt = :attempt, cancel_requested = :cancel_requested,
                update_time = :update_time, due_time = :due_time, last_sequence = :sequence,
                lease_token = :lease_token, lease_expires = :now + CAST(:lease_seconds * 1000000 AS INTEGER),
                worker = :worker
 WHERE position = :position;
INSERT INTO responses VALUES (:position, :sequence, :r_create_time, :r_state, :r_is_final, :r_data,
                              :r_output_type_url, :r_output_value, :r_progress_fraction, :r_progress_message,
                              :r_error, ${FEED_END} + 1)

-- name: save_job_released
-- A job no longer running (queued again, or ended): its lease is released.
UPDATE jobs SET state = :state, attempt = :attempt, cancel_requested = :cancel_requested,
                update_time = :update_time, due_time = :due_time, last_sequence = :sequence,
                lease_token = NULL, lease_expires = NULL, worker = NULL
 WHERE position = :position;
INSERT INTO responses VALUES (:position, :sequence, :r_create_time, :r_state, :r_is_final, :r_data,
                              :r_output_type_url, :r_output_value, :r_progress_fraction, :r_progress_message,
                              :r_error, ${FEED_END} + 1)

-- name: claim_due
-- Due queued jobs without flow policies, highest priority first, then in submit order; only
-- :types unless :any_type, only :queues unless :any_queue, never a paused queue's.
-- Read in the order of jobs_ready, so a claim stops after :limit (left to itself the planner
-- takes jobs_state and sorts every queued job: 14 ms a claim at 20,000 queued, 0.45 this way).
${JOB}
 WHERE j.position IN (
       SELECT j.position FROM jobs AS j INDEXED BY jobs_ready
        WHERE j.state = ${CREATED} AND j.gated = 0 AND j.due_time <= :now
          AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
        ORDER BY j.priority DESC, j.position
        LIMIT :limit)
 ORDER BY j.priority DESC, j.position

-- name: gated_due
-- Whether a due job with flow policies waits in scope (a claim then asks the gate first).
SELECT 1 FROM jobs AS j INDEXED BY jobs_gated
 WHERE j.state = ${CREATED} AND j.gated = 1 AND j.due_time <= :now
   AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
 LIMIT 1

-- name: plain_cutoff
-- Where the claim of :limit jobs without policies would stop (the last one's priority and
-- position): jobs with policies that come before it in claim order are asked about first.
SELECT j.priority, j.position FROM jobs AS j INDEXED BY jobs_ready
 WHERE j.state = ${CREATED} AND j.gated = 0 AND j.due_time <= :now
   AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
 ORDER BY j.priority DESC, j.position
 LIMIT 1 OFFSET :limit - 1

-- name: claim_gate_lock
-- Nothing to take: the writer thread already holds the database's lock for the whole batch.
SELECT 1

-- name: gated_candidates
-- A page of due jobs with flow policies in claim order, before the cutoff of the plain claim
-- (plain_cutoff) and after (:after_priority, :after_position),
-- with what the gate (ajs_grpc.core.flow.Gate) decides on: the running jobs of their
-- concurrency key, their rate bucket, the clock. Left out, as the gate would refuse them
-- anyway: keys at their limit (here or in :full_c / :full_r) and jobs that are not the first
-- unfinished one of their ordered key.
SELECT j.position, j.priority, j.concurrency_key, j.concurrency_limit, j.rate_key, j.rate, j.burst,
       j.ordered_key,
       (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key),
       b.tokens, b.update_time, :now
  FROM jobs AS j INDEXED BY jobs_gated
  LEFT JOIN rate_buckets b ON b.key = j.rate_key
 WHERE j.state = ${CREATED} AND j.gated = 1 AND j.due_time <= :now
   AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
   AND (j.priority < :after_priority OR (j.priority = :after_priority AND j.position > :after_position))
   AND (j.priority > :cut_priority OR (j.priority = :cut_priority AND j.position < :cut_position))
   AND (j.concurrency_key IS NULL
        OR (j.concurrency_key NOT IN (SELECT value FROM json_each(:full_c))
            AND (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key)
                < j.concurrency_limit))
   AND (j.rate_key IS NULL OR j.rate_key NOT IN (SELECT value FROM json_each(:full_r)))
   AND (j.ordered_key IS NULL
        OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                AND o.state < ${FINISHED} AND o.position < j.position))
 ORDER BY j.priority DESC, j.position
 LIMIT :page

-- name: lock_created
-- The jobs the gate admitted, read (the writer already holds the database's lock).
${JOB} WHERE j.position IN (SELECT value FROM json_each(:positions)) AND j.state = ${CREATED}
 ORDER BY j.priority DESC, j.position

-- name: save_bucket
-- A rate key's token bucket after a claim took tokens from it.
INSERT INTO rate_buckets (key, tokens, update_time) VALUES (:key, :tokens, :update_time)
    ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, update_time = excluded.update_time

-- name: lock_unique
-- Nothing to take: the writer thread already holds the database's lock for the whole batch.
SELECT 1

-- name: find_unique
-- The newest job of a unique key in :states, or created since :since.
${JOB}
 WHERE j.unique_key = :key
   AND (j.state IN (SELECT value FROM json_each(:states)) OR j.create_time >= :since)
 ORDER BY j.position DESC
 LIMIT 1

-- name: renew_leases
-- Extends the leases still held ({id: token} in :leases); says which were asked to cancel.
UPDATE jobs SET lease_expires = :now + CAST(:lease_seconds * 1000000 AS INTEGER)
  FROM json_each(:leases) AS held
 WHERE jobs.id = held.key AND jobs.lease_token = held.value AND jobs.state = ${PENDING}
RETURNING jobs.id, jobs.cancel_requested

-- name: expired_jobs
-- Running jobs whose lease ran out (their server died or hung).
${JOB} WHERE j.state = ${PENDING} AND j.lease_expires <= :now

-- name: orphaned_jobs
-- At open: every running job belonged to the previous server (the file lock proves it gone).
${JOB} WHERE j.state = ${PENDING}

-- name: next_due
-- When a claim in scope may next find work, and the clock it compares with: the earliest due
-- time of jobs without flow policies, of jobs with them not yet due, and of the next token of
-- buckets a claim emptied that due jobs wait on (only those no concurrency or order policy
-- holds back: the time may have passed, and such a job is claimable then); the earliest of the
-- three is taken. Jobs held back by a concurrency or order policy start when the job before
-- them ends: its end wakes the dispatcher. Jobs waiting for dependencies (no due time, which
-- sorts first here) are left out: the end of the last one they wait for wakes the dispatcher.
SELECT (SELECT j.due_time FROM jobs AS j INDEXED BY jobs_due
         WHERE j.state = ${CREATED} AND j.gated = 0 AND j.due_time IS NOT NULL AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
         ORDER BY j.due_time LIMIT 1),
       (SELECT j.due_time FROM jobs AS j INDEXED BY jobs_gated_due
         WHERE j.state = ${CREATED} AND j.gated = 1 AND j.due_time > :now AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
          AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
         ORDER BY j.due_time LIMIT 1),
       (SELECT min(b.update_time + CAST((1 - b.tokens) / j.rate * 1000000 AS INTEGER))
          FROM rate_buckets b CROSS JOIN jobs AS j INDEXED BY jobs_rate_keys
         WHERE b.tokens < 1 AND j.rate_key = b.key
           AND j.state = ${CREATED} AND j.rate_key IS NOT NULL AND j.gated = 1 AND j.due_time <= :now
           AND (:any_type OR j.type IN (SELECT value FROM json_each(:types)))
           AND (:any_queue OR j.queue IN (SELECT value FROM json_each(:queues)))
           AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)
           AND (j.concurrency_key IS NULL
                  OR (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key)
                     < j.concurrency_limit)
             AND (j.ordered_key IS NULL
                  OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                          AND o.state < ${FINISHED} AND o.position < j.position))),
       :now

-- name: cancel_tree
-- A job and its unfinished descendants, to cancel them together.
WITH RECURSIVE tree(id) AS (SELECT :id UNION SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id)
SELECT position FROM jobs WHERE id IN tree AND state IN (${CREATED}, ${PENDING}) ORDER BY position

-- name: mark_cancel_requested
-- A running job a client cancelled: its dispatcher stops it.
UPDATE jobs SET cancel_requested = 1 WHERE position = :position

-- name: delete_ended
-- Ended jobs older than :before without children left (leaves first: run until none is left).
UPDATE feed_floor SET n = ${FEED_END};
DELETE FROM responses WHERE position IN (
    SELECT position FROM jobs j WHERE state >= ${FINISHED} AND update_time < :before
       AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id));
DELETE FROM jobs WHERE position IN (
    SELECT position FROM jobs j WHERE state >= ${FINISHED} AND update_time < :before
       AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id))

-- name: list_jobs
-- A page of jobs in submit order after cursor :after; an empty filter matches anything.
${JOB}
 WHERE j.position > :after
   AND (:states = '[]' OR j.state IN (SELECT value FROM json_each(:states)))
   AND (:types = '[]' OR j.type IN (SELECT value FROM json_each(:types)))
   AND (:parent_id = '' OR j.parent_id = :parent_id)
   AND (:creator = '' OR j.creator = :creator)
 ORDER BY j.position
 LIMIT :limit

-- name: list_jobs_newest_first
-- A page of jobs, newest first, before cursor :after; an empty filter matches anything.
${JOB}
 WHERE j.position < :after
   AND (:states = '[]' OR j.state IN (SELECT value FROM json_each(:states)))
   AND (:types = '[]' OR j.type IN (SELECT value FROM json_each(:types)))
   AND (:parent_id = '' OR j.parent_id = :parent_id)
   AND (:creator = '' OR j.creator = :creator)
 ORDER BY j.position DESC
 LIMIT :limit

-- name: count_jobs
-- Jobs in one state (the queue depth, a principal's queued jobs).
SELECT count(*) FROM jobs WHERE state = :state AND (:creator = '' OR creator = :creator)

-- name: responses_after
-- A job's stored Responses after a sequence, in order (a page of a watch).
SELECT ${RESPONSE_COLUMNS} FROM responses r JOIN jobs j ON j.position = r.position
 WHERE j.id = :id AND r.sequence > :after ORDER BY r.sequence LIMIT :limit

-- name: feed_horizon
-- Where the feed may be read up to: every Response stored (numbers below the next one); the
-- newest number; this store's id; and the next number (no token is beyond).
SELECT ${FEED_END} + 1, ${FEED_END}, (SELECT store FROM feed_floor), ${FEED_END} + 1

-- name: feed
-- The feed's matching Responses after place (:k, :position, :sequence), below the horizon.
SELECT r.feed, r.position, j.id, j.type, j.queue, j.creator, j.parent_id, ${RESPONSE_COLUMNS}
  FROM responses r JOIN jobs j ON j.position = r.position
 WHERE r.feed >= :k AND (r.feed > :k OR (r.position, r.sequence) > (:position, :sequence))
   AND r.feed < :bound
   AND (:states = '[]' OR r.state IN (SELECT value FROM json_each(:states)))
   AND (:types = '[]' OR j.type IN (SELECT value FROM json_each(:types)))
   AND (:queues = '[]' OR j.queue IN (SELECT value FROM json_each(:queues)))
   AND (:parent_id = '' OR j.parent_id = :parent_id)
   AND (:creator = '' OR j.creator = :creator)
 ORDER BY r.feed
 LIMIT :limit

-- name: set_paused
-- Pauses or resumes a queue; the next claim sees it.
INSERT INTO queues (name, paused, update_time) VALUES (:name, :paused, :now)
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, update_time = excluded.update_time

-- name: list_queues
-- Every queue with unfinished jobs or paused: waiting and running jobs, the oldest waiting one.
SELECT name, sum(queued), sum(running), max(paused), min(oldest) FROM (
    SELECT queue AS name, count(*) FILTER (WHERE state = ${CREATED}) AS queued,
           count(*) FILTER (WHERE state = ${PENDING}) AS running, 0 AS paused,
           min(create_time) FILTER (WHERE state = ${CREATED}) AS oldest
      FROM jobs WHERE state < ${FINISHED} GROUP BY queue
    UNION ALL
    SELECT name, 0, 0, paused, NULL FROM queues WHERE paused
) GROUP BY name ORDER BY name

-- name: held_back
-- Due queued jobs held back now, by cause: a paused queue, then a full concurrency key, then an
-- unfinished earlier job of the ordered key, then an empty rate bucket (each counted once).
WITH causes AS (
    SELECT EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused) AS paused,
           (j.concurrency_key IS NOT NULL
            AND (SELECT count(*) FROM jobs p WHERE p.state = ${PENDING} AND p.concurrency_key = j.concurrency_key)
                >= j.concurrency_limit) AS concurrency,
           (j.ordered_key IS NOT NULL
            AND EXISTS (SELECT 1 FROM jobs o WHERE o.ordered_key = j.ordered_key
                                                AND o.state < ${FINISHED} AND o.position < j.position)) AS ordered,
           (b.key IS NOT NULL AND b.tokens + (:now - b.update_time) / 1000000.0 * j.rate < 1) AS rate
      FROM jobs j LEFT JOIN rate_buckets b ON b.key = j.rate_key
     WHERE j.state = ${CREATED} AND j.due_time <= :now
       AND (j.gated = 1 OR EXISTS (SELECT 1 FROM queues q WHERE q.name = j.queue AND q.paused)))
SELECT count(*) FILTER (WHERE paused),
       count(*) FILTER (WHERE NOT paused AND concurrency),
       count(*) FILTER (WHERE NOT paused AND NOT concurrency AND ordered),
       count(*) FILTER (WHERE NOT paused AND NOT concurrency AND NOT ordered AND rate)
  FROM causes

-- name: add_dependencies
-- The edges of new jobs with dependencies, and the mark on what they depend on.
INSERT INTO dependencies VALUES (:depends_on, :request_id);
UPDATE jobs SET has_dependents = 1 WHERE id = :depends_on AND has_dependents = 0

-- name: waiting_dependents
-- The jobs waiting for a job that just ended (the writer holds the database's lock).
${JOB} WHERE j.id IN (SELECT request_id FROM dependencies WHERE depends_on = :id)
   AND j.state = ${CREATED} AND j.due_time IS NULL
 ORDER BY j.position

-- name: release_job
-- A waiting job whose dependencies all ended: due from now on.
UPDATE jobs SET due_time = :due_time WHERE position = :position

-- name: lapsed_jobs
-- Queued jobs past their expire_time, that no claim met: they end EXPIRED.
${JOB} WHERE j.state = ${CREATED} AND j.expire_time <= :now

-- name: job_tree
-- A job and all its descendants, to delete them together.
WITH RECURSIVE tree(id) AS (SELECT :id UNION SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id)
SELECT position, id, state FROM jobs WHERE id IN tree ORDER BY position

-- name: delete_jobs
-- Jobs by position (a JSON array) with their Responses and their edges.
UPDATE feed_floor SET n = ${FEED_END};
DELETE FROM responses WHERE position IN (SELECT value FROM json_each(:positions));
DELETE FROM dependencies WHERE request_id IN (
    SELECT id FROM jobs WHERE position IN (SELECT value FROM json_each(:positions)));
DELETE FROM jobs WHERE position IN (SELECT value FROM json_each(:positions))

-- name: forget_dependencies
-- The edges of jobs pruned (no longer stored).
DELETE FROM dependencies WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = dependencies.request_id)

-- name: insert_schedule
-- A new schedule unless the id is stored.
INSERT OR IGNORE INTO schedules VALUES (:id, :cron, :time_zone, :template, :overlap, :catchup, :paused, :creator,
                              :create_time, :update_time, :last_time, :last_job_id)

-- name: replace_schedule
-- Another definition of a stored schedule; its progress and pause stay.
UPDATE schedules SET cron = :cron, time_zone = :time_zone, template = :template, overlap = :overlap,
                     catchup = :catchup, creator = :creator, update_time = :update_time
 WHERE id = :id

-- name: find_schedule
-- A schedule by id.
SELECT * FROM schedules WHERE id = :id

-- name: list_schedules
-- A page of schedules by id after :after; only :creator's unless empty.
SELECT * FROM schedules WHERE id > :after AND (:creator = '' OR creator = :creator) ORDER BY id LIMIT :limit

-- name: delete_schedule
-- A schedule (its jobs stay).
DELETE FROM schedules WHERE id = :id

-- name: pause_schedule
-- Pauses or resumes a schedule; a resumed one goes on from :now.
UPDATE schedules SET paused = :paused, update_time = :now,
                     last_time = CASE WHEN :paused THEN last_time ELSE :now END
 WHERE id = :id AND paused != :paused

-- name: advance_schedule
-- Records a schedule's occurrences as handled if no other instance did first (compare and set).
UPDATE schedules SET last_time = :new_last_time,
                     last_job_id = CASE WHEN :last_job_id = '' THEN last_job_id ELSE :last_job_id END
 WHERE id = :id AND NOT paused AND last_time IS :last_time

-- name: lock_dependency
-- A dependency read for a retry by hand (the writer already holds the database's lock).
UPDATE jobs SET has_dependents = 1 WHERE id = :depends_on
