package ajs_test

// Compiled by go vet and go test (not run: it needs a server); README.md shows the same code.

import (
	"context"
	"fmt"
	"io"
	"log"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
)

func Example() {
	ctx := context.Background()
	client, err := ajs.Dial("127.0.0.1:50051", ajs.Options{}) // or {CAFile: "ca.pem", Token: "..."}
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	job, _, err := client.Submit(ctx, &ajspb.Request{Type: "countdown", Data: map[string]string{"steps": "5"}})
	if err != nil {
		log.Fatal(err) // an *ajs.Error: ajs.Reason(err) is the ErrorInfo reason
	}
	watch := client.Watch(ctx, job.GetRequest().GetId(), 0) // resumes by itself after a dropped stream
	defer watch.Close()
	for {
		r, err := watch.Next()
		if err == io.EOF {
			break // after the final Response
		}
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(r.GetSequence(), r.GetState(), r.GetProgress().GetFraction())
	}

	_, err = client.Get(ctx, "no-such-job")
	fmt.Println(ajs.Reason(err)) // REQUEST_NOT_FOUND
}
