// A typed use of the client, checked by `tsc --noEmit -p test/tsconfig.json` (types.test.js);
// never run. Each @ts-expect-error line must stay an error, so the types are not too loose.
import { AjsClient, AjsError, Job, Response, WatchJobsEvent, status, toDate, stateName, Worker, JobError, WorkerJob, descriptorSet } from '..';
import { Root } from 'protobufjs';

interface HashInput { data: Buffer | string; algorithm?: 'ALGORITHM_SHA256' | 'ALGORITHM_SHA512'; rounds?: number; [field: string]: unknown }
interface HashOutput { hexDigest: string; [field: string]: unknown }

export async function usage(): Promise<void> {
  const client = new AjsClient('localhost:50051', { tls: { caFile: 'ca.pem' }, token: async () => 'token', deadlineMs: 5000 });
  const plain = new AjsClient('127.0.0.1:50051', { token: 'alice-token', backoff: { maxMs: 2000, maxRetries: 5 } });

  const { job, created }: { job: Job; created: boolean } = await client.submit<HashInput>('hash', {
    input: { data: Buffer.from('hello'), algorithm: 'ALGORITHM_SHA256', rounds: 10 },
    queue: 'default', priority: 1, runAfter: new Date(), timeout: 30, data: { k: 'v' },
  });
  const id: string = job.request.id;
  const when: Date | null = toDate(job.request.createTime);
  void created; void when;

  const answers = await client.batchSubmit([{ type: 'echo', data: { n: '1' } }, { type: 'hash', input: { data: 'aGk=' }, dependsOn: [id] }]);
  const firstState: string = answers[0].job.state;
  void firstState;

  for await (const listed of client.list({ states: ['FAILED', 'REQUEST_STATE_CANCELLED'], types: ['hash'], view: 'BASIC', orderBy: 'create_time desc' })) {
    const attempt: number = listed.attempt;
    void attempt;
  }
  for await (const page of client.listPages({ pageSize: 10 })) {
    const next: string = page.nextPageToken;
    void next;
  }

  const controller = new AbortController();
  for await (const response of client.watch(id, { afterSequence: 3, signal: controller.signal, onRetry: (error, attempt, delayMs) => { void error.codeName; void attempt; void delayMs; } })) {
    const sequence: number = response.sequence;
    const fraction: number | undefined = response.progress?.fraction;
    void sequence; void fraction;
  }
  const final: Response = await client.wait(id, { onResponse: (r) => { void r.state; } });
  const output = await client.decodeOutput<HashOutput>(final);
  const digest: string | undefined = output?.hexDigest;
  void digest;
  if (final.error) {
    const failure = AjsError.fromStatus(final.error);
    void failure.reason;
  }

  let token = '';
  for await (const event of client.watchJobs({ types: ['hash'], states: ['FINISHED'] }, { afterToken: token, bookmarks: true })) {
    const e: WatchJobsEvent = event;
    token = e.resumeToken;
    if (e.response && e.response.isFinal) break;
  }

  const cancelled: Job = await client.cancel(id);
  const retried: Job = await client.retry(id);
  const deleted: number = await client.delete(id);
  const types = await client.jobTypes();
  const inputType: string = types[0].inputType;
  void cancelled; void retried; void deleted; void inputType;

  try {
    await client.get('nope');
  } catch (error) {
    if (error instanceof AjsError && error.code === status.NOT_FOUND) {
      const reason: string = error.reason;
      const fields: string[] = error.fieldViolations.map((v) => v.field);
      void reason; void fields;
    }
  }
  const full = stateName('FINISHED');
  void full;

  // @ts-expect-error: a state that does not exist
  client.list({ states: ['DONE'] });
  // @ts-expect-error: the id is a string
  client.get(42);
  // @ts-expect-error: watch yields Responses, whose sequence is a number
  for await (const response of client.watch(id)) { const s: string = response.sequence; void s; }
  // @ts-expect-error: no such option
  new AjsClient('x', { tsl: true });
  // @ts-expect-error: data values are strings
  await client.submit('echo', { data: { n: 1 } });
  plain.close();
  client.close();
}

export async function workerUsage(root: Root): Promise<void> {
  const worker = new Worker({ target: '127.0.0.1:50051', token: 'worker-token', name: 'w', maxConcurrent: 4, backoff: { maxMs: 2000 } });
  worker.register<{ data: Buffer; algorithm: string; rounds: number }>('hash', {
    description: 'hashes', inputType: 'ajs.examples.v1.HashRequest', outputType: 'ajs.examples.v1.HashResponse', root,
    retryPolicy: { maxAttempts: 3, initialBackoff: 0.2, maxBackoff: 2, multiplier: 2, jitter: 0 }, timeout: 30,
  }, async (job) => {
    const rounds: number = job.input.rounds;
    job.progress(0.5, 'half', { rounds });
    if (job.signal.aborted) throw new JobError(status.CANCELLED, 'stopped', { reason: 'STOPPED', retryDelayMs: 100, nonRetryable: true });
    const deadline: Date | null = job.deadline;
    void deadline;
    return { output: { hexDigest: 'ab' }, data: { attempt: job.attempt } };
  });
  worker.register('untyped', async (job: WorkerJob) => { void job.request.data; });
  worker.on('registered', ({ workerId }) => { const id: string = workerId; void id; });
  worker.on('reconnecting', (error, attempt, delayMs) => { void error?.codeName; void attempt; void delayMs; });
  const set: Buffer = descriptorSet(root, ['ajs.examples.v1.HashRequest']);
  void set;
  const running: number = worker.running;
  void running;
  const controller = new AbortController();
  const done: Promise<void> = worker.run({ signal: controller.signal });
  await worker.drain();
  await done;
  // @ts-expect-error: maxConcurrent is a number
  new Worker({ maxConcurrent: '2' });
  // @ts-expect-error: a handler's data values are strings, numbers or booleans
  worker.register('bad', async () => ({ data: { x: {} } }));
  // @ts-expect-error: no such event
  worker.on('assigned', () => {});
}
