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
                      last_sequence)
    VALUES (%(id)s, %(parent_id)s, %(type)s, %(creator)s, %(create_time)s, %(data)s, %(input_type_url)s,
            %(input_value)s, %(priority)s, %(run_after)s, %(max_attempts)s, %(state)s, %(attempt)s,
            %(cancel_requested)s, %(update_time)s, %(due_time)s, %(sequence)s)
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
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s
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
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s
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
       %(r_output_type_url)s, %(r_output_value)s, %(r_progress_fraction)s, %(r_progress_message)s, %(r_error)s
  FROM saved

-- name: claim_due
-- Due queued jobs, highest priority first, then in submit order; instances never wait for
-- each other nor share a job (SKIP LOCKED). Only %(types)s unless %(any_type)s.
-- The jobs are chosen and locked on their own table, then read with their last Response:
-- joined in one query, the planner misjudged the join (120 rows estimated, 190,000 found at
-- 200,000 queued) and sorted the whole queue on disk, 427 ms a claim.
WITH due AS (
    SELECT j.position FROM jobs j
     WHERE j.state = ${CREATED} AND j.due_time <= COALESCE(%(now)s::timestamptz, clock_timestamp())
       AND (%(any_type)s OR j.type = ANY(%(types)s::text[]))
     ORDER BY j.priority DESC, j.position
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED)
${JOB}
 WHERE j.position IN (SELECT position FROM due)
 ORDER BY j.priority DESC, j.position

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
-- The earliest due time of the queued jobs, and the database's clock it compares with.
SELECT min(due_time), COALESCE(%(now)s::timestamptz, clock_timestamp()) FROM jobs WHERE state = ${CREATED}

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
