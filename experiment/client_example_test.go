package experiment_test

import (
	"context"
	"fmt"
	"log"

	"github.com/fx-fl/fx/experiment"
)

// A researcher's program: submit an experiment directory, print its metrics
// as they arrive (across dropped connections), and download the best model.
func Example() {
	ctx := context.Background()
	c, err := experiment.Dial(ctx, experiment.ClientConfig{
		Director: "director.example.org:50051",
		Cert:     "alice.crt",
		Key:      "alice.key",
		CA:       "ca.crt",
	})
	if err != nil {
		log.Fatal(err) // wrong role, unreachable director (named), unreadable files
	}
	defer c.Close()

	e, err := c.Submit(ctx, "./fashion-mlp", experiment.SubmitOptions{
		Progress: func(sent, total int64) { fmt.Printf("\r%d/%d bytes", sent, total) },
	})
	if err != nil {
		log.Fatal(err) // the director's reason, e.g. an invalid plan
	}
	for ev, err := range c.Metrics(ctx, e.GetName(), 0) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(ev.GetSequence(), ev.GetRound(), ev.GetTask(), ev.GetCollaborator(), ev.GetMetrics())
	}
	final, err := c.Wait(ctx, e.GetName()) // an *experiment.EndedError unless FINISHED
	if err != nil {
		log.Fatal(err)
	}
	model, info, err := c.Model(ctx, final.GetName(), experiment.SelectBest)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("best model: round %d, %d tensors, %v\n", info.GetRound(), len(model), info.GetMetrics())
	if _, err := c.ModelToFile(ctx, final.GetName(), experiment.SelectLast, "last.safetensors"); err != nil {
		log.Fatal(err)
	}
}
